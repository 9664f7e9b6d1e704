"""python -m loadtest.scenarios {sweep,long-context,memserver-join,memserver-kill,chaos} [options]"""

import argparse
import sys

from loadtest.scenarios import chaos, long_context, memserver_faults, sweep

parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios")
sub = parser.add_subparsers(dest="scenario", required=True)
for name, module, main, help_text in (
    ("sweep", sweep, sweep.main, "throughput/latency vs concurrency (optionally per memserver count)"),
    ("long-context", long_context, long_context.main, "longest servable prompt with 0..3 memservers"),
    ("memserver-join", memserver_faults, memserver_faults.main_join, "a memserver joins during load"),
    ("memserver-kill", memserver_faults, memserver_faults.main_kill, "a memserver is killed during load"),
    ("chaos", chaos, chaos.main, "memservers and engines killed, frozen, stopped under load; answers checked"),
):
    p = sub.add_parser(name, help=help_text)
    module.add_arguments(p)
    p.set_defaults(main=main)
args = parser.parse_args()
sys.exit(args.main(args))
