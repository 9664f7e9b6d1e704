import sys

from services.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
