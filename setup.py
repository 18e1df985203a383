"""Build script: the pure-Python package plus the optional C++ extension ``spo_fast._C``.

``kernels/`` is installed as the sub-package ``spo_fast.kernels`` (a top-level ``kernels`` module would clash
with Hugging Face's ``kernels`` package on PyPI).

``spo_fast._C`` (``csrc/``: resampler bookkeeping) is plain pybind11 over numpy arrays; it needs no torch headers.
It is optional: without a compiler or pybind11 the install still succeeds and ``spo_fast`` uses its pure-Python
fallback (logging once, at first use, why). Environment switches:

- ``SPO_FAST_BUILD_EXT=0``: never build the extension.
- ``SPO_FAST_BUILD_EXT=1``: the extension is required; a failed build fails the install.
- unset / ``auto``: build it when possible, otherwise warn and go on.
- ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).

For an editable checkout, ``pip install -e . --no-build-isolation`` builds ``spo_fast/_C*.so`` in place.
"""

import os
import sys
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

packages = find_packages(include=["spo_fast", "spo_fast.*"])
package_dir = {"": "."}
if os.path.isdir("kernels"):
    packages.append("spo_fast.kernels")
    package_dir["spo_fast.kernels"] = "kernels"

BUILD_EXT = os.environ.get("SPO_FAST_BUILD_EXT", "auto").strip().lower()
if BUILD_EXT not in {"0", "1", "auto", ""}:
    sys.exit(f"SPO_FAST_BUILD_EXT must be 0, 1 or auto, got {BUILD_EXT!r}")
REQUIRED = BUILD_EXT == "1"


def _warn(msg: str) -> None:
    # setuptools shows stderr of the build backend with pip -v; keep the message self-explanatory.
    sys.stderr.write(f"\n[spo_fast] {msg}\n\n")


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed C++ build into a warning unless SPO_FAST_BUILD_EXT=1."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...: all recoverable by the fallback
            if REQUIRED:
                raise
            _warn(f"building spo_fast._C failed ({exc}); installing the pure-Python fallback instead.")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if REQUIRED:
                raise
            _warn(f"building {ext.name} failed ({exc}); installing the pure-Python fallback instead.")


def _extensions() -> tuple[list, dict]:
    if BUILD_EXT == "0":
        return [], {}
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        if REQUIRED:
            raise
        _warn("pybind11 is not installed: skipping spo_fast._C (pure-Python fallback).")
        return [], {}
    # Two translation units (core, bindings) compile in parallel; this is what ninja would buy us here, without
    # depending on torch.utils.cpp_extension.
    ParallelCompile("MAX_JOBS", default=0).install()
    ext = Pybind11Extension(
        "spo_fast._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"] if os.name != "nt" else ["/O2"],
    )
    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
