"""`python tools/synthetic.py ...` is `vision synthetic ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthetic", *sys.argv[1:]]))
