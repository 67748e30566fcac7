"""`python tools/eval.py ...` is `vision eval ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
