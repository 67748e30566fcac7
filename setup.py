"""The compiled part of vision: the COCO results reader (``vision/ensemble/_columns.c``).

Everything else is in ``pyproject.toml``.  The extension is optional: where it cannot be built (no C
compiler), ``vision fuse`` reads results files with msgspec instead, the same columns more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vision.ensemble._columns",
            sources=["vision/ensemble/_columns.c"],
            depends=["vision/ensemble/_pow10_table.h"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
