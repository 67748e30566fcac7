"""`python tools/convert.py ...` is `vision convert ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
