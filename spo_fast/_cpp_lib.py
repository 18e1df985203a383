"""The one place that loads the optional C++ extension ``spo_fast._C`` (xformers' ``_cpp_lib.py`` pattern).

The import is tried once. When it fails, or the build is stale (its ``API_VERSION`` differs from the Python side),
the reason is kept, a single ``logging.warning`` at first use says why and how to build it, and callers take the
pure-Python fallback, which gives bit-identical results.

``SPO_FAST_CPP`` picks the backend for the whole process: ``auto`` (default; C++ when it loads), ``1`` (C++ is
required: a missing build raises instead of falling back) or ``0`` (always the Python fallback, no warning).
:func:`set_cpp_mode` overrides it at run time (tests use it to run both backends in one process).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

__all__ = [
    "EXTENSION_API_VERSION",
    "cpp_available",
    "cpp_unavailable_reason",
    "cpp_module",
    "get_cpp",
    "set_cpp_mode",
    "cpp_mode",
]

logger = logging.getLogger("spo_fast")

# Must equal spo_fast::kApiVersion in csrc/ledger_core.h.
EXTENSION_API_VERSION = 2

BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` (needs a C++17 compiler and pybind11; "
    "SPO_FAST_BUILD_EXT=1 makes a failed build an error), or set SPO_FAST_CPP=0 to silence this"
)

_MODES = ("auto", "0", "1")
_mode: str | None = None  # None: read SPO_FAST_CPP on each call (cheap) so monkeypatched env vars take effect
_tried = False
_module: ModuleType | None = None
_reason: str | None = None
_warned = False


def _load() -> None:
    global _tried, _module, _reason
    if _tried:
        return
    _tried = True
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        _reason = f"spo_fast._C is not built or failed to import ({exc})"
        return
    version = getattr(_C, "API_VERSION", None)
    if version != EXTENSION_API_VERSION:
        _reason = (
            f"spo_fast._C is stale: built with API_VERSION={version}, this spo_fast needs "
            f"{EXTENSION_API_VERSION} (rebuild after pulling C++ changes)"
        )
        return
    _module = _C


def cpp_mode() -> str:
    """The effective mode: ``auto``, ``0`` or ``1``."""
    mode = _mode if _mode is not None else os.environ.get("SPO_FAST_CPP", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"SPO_FAST_CPP must be one of {_MODES}, got {mode!r}")
    return mode


def set_cpp_mode(mode: str | int | bool | None) -> None:
    """Override ``SPO_FAST_CPP`` for this process: ``'auto'``, ``True``/``1``, ``False``/``0``; ``None`` restores it."""
    global _mode
    if mode is None:
        _mode = None
        return
    value = ("1" if mode else "0") if isinstance(mode, bool) else str(mode).strip().lower()
    if value not in _MODES:
        raise ValueError(f"C++ mode must be one of {_MODES}, got {mode!r}")
    _mode = value


def cpp_available() -> bool:
    """Whether ``spo_fast._C`` loaded and matches this version (independent of the mode)."""
    _load()
    return _module is not None


def cpp_unavailable_reason() -> str | None:
    _load()
    return _reason


def cpp_module() -> ModuleType | None:
    """The loaded extension regardless of the mode (``None`` when unavailable); for explicit ``backend='cpp'``."""
    _load()
    return _module


def get_cpp() -> ModuleType | None:
    """The extension module when the mode allows it and it loaded; ``None`` means "use the Python fallback".

    Raises:
        RuntimeError: mode ``1`` (required) and the extension is unavailable.
    """
    global _warned
    mode = cpp_mode()
    if mode == "0":
        return None
    _load()
    if _module is not None:
        return _module
    if mode == "1":
        raise RuntimeError(f"SPO_FAST_CPP=1 but {_reason}; {BUILD_HINT}")
    if not _warned:
        _warned = True
        logger.warning(
            "%s; using the pure-Python fallback (same results, slower). To get the C++ path, %s.", _reason, BUILD_HINT
        )
    return None
