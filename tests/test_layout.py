"""The repository's top-level kernels/ folder is spo_fast.kernels and must never shadow PyPI's ``kernels`` package
(a dependency of transformers): ``python -m ...`` from a checkout puts the repository root on sys.path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_kernels_is_not_the_repository_folder():
    code = (
        "import importlib.util, kernels, spo_fast.kernels.spo_loss as k; "
        "print(kernels.__file__); print(k.__file__); "
        "print(importlib.util.find_spec('spo_fast.kernels.head_score') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top, ours, head = out.split()
    assert Path(top).resolve().parent != ROOT / "kernels", top
    assert Path(ours).resolve() == ROOT / "kernels" / "spo_loss.py"
    assert head == "True"


# Hugging Face's kernels package hidden (the guard's search past the repository root finds nothing, no metadata),
# as on a machine without it: transformers' availability check must say "absent" instead of raising (seen with
# transformers 5.17, which imports whatever find_spec located: this folder).
HIDDEN = """
import importlib.machinery as m, importlib.metadata as md
_find, _version = m.PathFinder.find_spec, md.version
def find_spec(name, path=None, target=None):
    return None if name == "kernels" and path is not None else _find(name, path, target)
def version(name):
    if "kernels" in name.lower():
        raise md.PackageNotFoundError(name)
    return _version(name)
m.PathFinder.find_spec, md.version = find_spec, version
"""


def test_absent_hub_kernels_reads_as_absent_not_as_an_error():
    code = HIDDEN + (
        "from transformers.utils.import_utils import _is_package_available\n"
        "print(_is_package_available('kernels', return_version=True))\n"
        "import kernels, spo_fast.kernels.spo_loss\n"
        "print(kernels.__file__, getattr(kernels, '__version__', 'N/A'))\n"
        "try:\n"
        "    kernels.get_kernel\n"
        "except AttributeError as e:\n"
        "    print('AttributeError', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    avail, top, imp = proc.stdout.splitlines()
    assert avail == "(False, 'N/A')"
    assert top == "None N/A"
    assert imp.startswith("AttributeError") and "spo_fast.kernels" in imp
