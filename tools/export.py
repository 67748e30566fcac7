"""`python tools/export.py ...` is `vision export ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
