"""`python tools/inspect_data.py ...` is `vision inspect ...`: same arguments, same behaviour.

Not ``tools/inspect.py``: a script's folder comes first on ``sys.path``, and a file of that name
would stand in for the standard library's ``inspect`` module that torch and dataclasses import.
"""

import sys

from vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
