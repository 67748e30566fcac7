"""`python tools/train.py ...` is `vision train ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
