"""`python tools/expand.py ...` is `vision expand ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["expand", *sys.argv[1:]]))
