"""The optional native part of pmlb: the ``nghttp2`` link transport's byte
work (``node/pmlb/transport/_nghttp2.pyx``), compiled with Cython against
libnghttp2 (Debian: ``libnghttp2-dev``).

Everything else is in pyproject.toml. When the compiler, Cython or the
headers are missing, the build goes on without the extension: pmlb then runs
its links on grpclib (pure Python) and the node says so when it starts.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the extension is an
    accelerator with a pure-Python fallback, never a requirement."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(f"pmlb: native link transport not built ({exc}); using grpclib", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"pmlb: {ext.name} not built ({exc}); using grpclib", file=sys.stderr)


def _extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        print(
            "pmlb: Cython is not installed; the native link transport is not built", file=sys.stderr
        )
        return []
    ext = Extension(
        "pmlb.transport._nghttp2",
        ["node/pmlb/transport/_nghttp2.pyx"],
        libraries=["nghttp2"],
        extra_compile_args=["-O2"],
    )
    try:
        return list(cythonize([ext], language_level=3, quiet=True))
    except Exception as exc:
        print(
            f"pmlb: cythonize failed ({exc}); the native link transport is not built",
            file=sys.stderr,
        )
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
