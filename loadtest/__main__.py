import argparse
import sys

from loadtest.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m loadtest", description="load generator for OpenAI-compatible servers")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
