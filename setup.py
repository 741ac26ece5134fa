"""Extension list and build switches for fastgw's Cython core; metadata is in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# FASTGW_DEBUG=1 builds the core with assertions and without -O3; parsed explicitly
# because bool("0") is True.
_debug = os.environ.get("FASTGW_DEBUG", "0").strip().lower() in ("1", "true", "yes")

_cflags = ["-O0", "-g"] if _debug else ["-O3"]

extensions = [
    Extension(
        f"fastgw._core.{name}",
        [f"fastgw/_core/{name}.pyx"],
        extra_compile_args=_cflags,
    )
    for name in ("http", "metrics", "acl", "shm", "bucket", "budget")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": _debug,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": _debug,
        },
    ),
)
