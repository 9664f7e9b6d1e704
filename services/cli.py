"""`kvmesh` console entry point: one subcommand a module, imported lazily so that e.g. the router
never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("services.worker.generate_cli", "offline generation on one process, streamed to the terminal"),
    "worker": ("services.worker.cli", "serve a model as a kvmesh worker"),
    "router": ("services.router.cli", "OpenAI-compatible HTTP router and global KV manager"),
    "chat": ("services.chat", "streaming chat client for any OpenAI-compatible server"),
    "memserver": ("services.memserver.cli", "KV memory server: hold spilled blocks, compute partial attention"),
    "up": ("services.launcher", "start a local cluster (router, workers, memservers)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvmesh", description="kvmesh: cluster-wide KV cache LLM serving")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"kvmesh {name}: not available in this build", file=sys.stderr)
        return 2
    cmd_parser = argparse.ArgumentParser(prog=f"kvmesh {name}", description=help_text)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
