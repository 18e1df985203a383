"""Attention backend choice: SDPA on CPU, clear fallbacks when xformers is missing or broken; bf16 fallback."""

import logging
import sys
import types

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from spo_fast import attention, precision
from spo_fast.attention import configure_attention


@pytest.fixture
def unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8, cross_attention_dim=16,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(attention, "_PROBES", {})
    monkeypatch.setattr(attention, "_LOGGED", set())
    monkeypatch.setattr(precision, "_LOGGED", set())


def _all_sdpa(unet):
    return all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_auto_on_cpu_picks_sdpa_and_logs_once(unet, caplog):
    with caplog.at_level(logging.INFO, logger="spo_fast.attention"):
        assert configure_attention(unet, "auto") == "sdpa"
        assert configure_attention(unet, "auto") == "sdpa"
    assert _all_sdpa(unet)
    assert len([r for r in caplog.records if "using PyTorch SDPA" in r.message]) == 1


def test_xformers_on_cpu_falls_back_with_message(unet, caplog):
    with caplog.at_level(logging.WARNING, logger="spo_fast.attention"):
        assert configure_attention(unet, "xformers") == "sdpa"
    (rec,) = [r for r in caplog.records if "xformers attention was requested" in r.message]
    assert "CUDA device" in rec.message and _all_sdpa(unet)


def test_xformers_missing_or_broken_falls_back(unet, monkeypatch, caplog):
    # Pretend the UNet sits on a GPU so the probe gets as far as importing xformers.
    monkeypatch.setattr(attention, "_module_device_dtype", lambda m: (torch.device("cuda"), torch.float16))
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails like a missing package
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with caplog.at_level(logging.WARNING, logger="spo_fast.attention"):
        assert configure_attention(unet, "xformers") == "sdpa"
    assert any("xformers" in r.message and "SDPA" in r.message for r in caplog.records)

    broken = types.ModuleType("xformers.ops")

    def boom(*a, **k):
        raise RuntimeError("no kernel image is available")

    broken.memory_efficient_attention = boom
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", broken)
    monkeypatch.setattr(attention, "_PROBES", {})
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros(1, 8, 2, 16))
    ok, reason = attention.xformers_usable("cuda", torch.float16)
    assert not ok and "installed but its attention fails" in reason and "no kernel image" in reason


def test_unknown_backend_is_an_error(unet):
    with pytest.raises(ValueError, match="auto"):
        configure_attention(unet, "flash3")


def test_bf16_unsupported_falls_back_to_fp32(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    with caplog.at_level(logging.WARNING, logger="spo_fast.precision"):
        assert precision.resolve_dtype("bf16", "cuda") == torch.float32
        assert precision.resolve_dtype("bf16", "cuda") == torch.float32
    msgs = [r.message for r in caplog.records if "bf16 is not supported" in r.message]
    assert len(msgs) == 1 and "Tesla T4" in msgs[0]
    assert precision.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert precision.resolve_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ValueError):
        precision.resolve_dtype("int8", "cpu")


def test_cast_frozen_keeps_trainable_fp32():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    m[0].requires_grad_(False)
    precision.cast_frozen(m, torch.bfloat16)
    assert m[0].weight.dtype == torch.bfloat16 and m[1].weight.dtype == torch.float32
    with precision.autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
