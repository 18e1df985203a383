import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never download: a hub id that is not cached fails at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a kernel is
# decorated, so it must be set before any test imports spo_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).parent / "data"

# Two cores: keep torch from oversubscribing when pytest-xdist or child processes run beside us.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seed() -> int:
    """Seeds python, numpy and torch; returns the seed for generators."""
    s = 1234
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((DATA / "spo_reference_cases.json").read_text())


@pytest.fixture(scope="session")
def sd_scheduler():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    s.set_timesteps(20)
    return s


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
