"""`python tools/eval_dets.py ...` is `vision eval-dets ...`: same arguments, same behaviour."""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-dets", *sys.argv[1:]]))
