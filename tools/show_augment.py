"""`python tools/show_augment.py ...` is `vision show-augment ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["show-augment", *sys.argv[1:]]))
