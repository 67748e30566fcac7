"""``python -m vision`` is the ``vision`` command."""

from vision.cli import entry

entry()
