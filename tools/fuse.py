"""`python tools/fuse.py ...` is `vision fuse ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["fuse", *sys.argv[1:]]))
