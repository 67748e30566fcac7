"""User-facing errors.

A ``VisionError`` carries a message that is already fit to print on one line: it names the file and
the problem.  The command line turns it into ``error: <message>`` and a non-zero exit code instead of
a traceback, so anything raised for bad input should be (or wrap into) a ``VisionError``.
"""

from __future__ import annotations

import os


class VisionError(Exception):
    """Bad input or configuration, explained in one line."""


class ConfigError(VisionError):
    """A config file or override that cannot be used."""


class DataError(VisionError):
    """An annotation file or data set that cannot be read."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ImageReadError(DataError):
    """An image file that cannot be decoded (missing, empty, truncated or not an image)."""
