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
