import sys

from services.memserver.cli import add_arguments, main

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.memserver")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
