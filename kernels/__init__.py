"""Triton kernels of spo_fast, installed as ``spo_fast.kernels``.

The front end never imports these by name: ``spo_fast`` functions dispatch to them when CUDA and Triton are
present and fall back to the PyTorch references otherwise.
"""

if __name__ == "kernels":
    # Imported as a top-level module: ``python -m ...`` run from the repository root put the root on sys.path, and
    # this folder shadows Hugging Face's ``kernels`` package (a dependency of transformers, imported by diffusers).
    # Hand the name over to that package so that ``import diffusers`` keeps working from a checkout.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _paths = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _paths)
    if _spec is None:
        # That package is not installed. Raising here would break transformers (its availability check imports a
        # name that find_spec located, here this folder, without catching): instead look like what it treats as a
        # folder shadowing a package, a namespace package with no file and no version, so it reports "absent".
        __file__ = None
        __path__: list[str] = []

        def __getattr__(name: str):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: this is the repository's kernels/ folder (import it as "
                "spo_fast.kernels), and Hugging Face's kernels package is not installed"
            )
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
