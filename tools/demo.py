"""`python tools/demo.py ...` is `vision demo ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
