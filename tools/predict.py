"""`python tools/predict.py ...` is `vision predict ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
