"""The compiled parts of vision: the COCO results reader (``vision/ensemble/_columns.c``) and the
Winograd transforms (``vision/inference/_winograd_native.c``).

Everything else is in ``pyproject.toml``.  Both extensions are optional: where one cannot be built (no
C compiler, no OpenMP), ``vision fuse`` reads results files with msgspec and the inference engine
computes the transforms with tensor operations instead: the same results, more slowly.
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
        ),
        Extension(
            "vision.inference._winograd_native",
            sources=["vision/inference/_winograd_native.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
    ]
)
