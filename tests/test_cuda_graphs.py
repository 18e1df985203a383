"""CUDA-graph denoiser: a pass-through on CPU and under autograd; on a GPU, graph samples equal eager samples."""

import logging

import pytest
import torch
from diffusers import DDIMScheduler

from spo_fast.cuda_graphs import GraphedDenoiser, cuda_graphs_requested, maybe_graph
from spo_fast.sampler import PoolSampler, PoolSamplerConfig


class Affine(torch.nn.Module):
    """eps = conv(x) + t-embedding + cond: a tiny capturable denoiser with every input kind of the real one."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        return self.conv(x) * 0.1 + (t.float() / 1000).view(-1, 1, 1, 1) + cond.view(-1, 1, 1, 1)


def _sched():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def test_cpu_is_a_pass_through(caplog):
    den = Affine()
    assert maybe_graph(den, "cpu") is den
    with caplog.at_level(logging.INFO, logger="spo_fast.cuda_graphs"):
        assert maybe_graph(den, "cpu", enabled=True) is den  # asked for graphs on CPU: one log line, eager
        assert maybe_graph(den, "cpu", enabled=True) is den
    assert sum("CUDA graphs need a CUDA device" in r.message for r in caplog.records) <= 1
    g = GraphedDenoiser(den)
    x, t, c = torch.randn(3, 2, 4, 4), torch.full((3,), 500), torch.randn(3)
    with torch.no_grad():
        assert torch.equal(g(x, t, c), den(x, t, c))
    assert g.stats["eager"] == 1 and g.num_graphs == 0
    assert g.conv is den.conv  # attributes fall through to the wrapped denoiser
    assert maybe_graph(g, "cuda") is g  # idempotent


def test_env_switch_turns_graphs_off(monkeypatch):
    monkeypatch.setenv("SPO_FAST_CUDA_GRAPHS", "0")
    assert not cuda_graphs_requested(None, "cuda")
    assert not cuda_graphs_requested(True, "cuda")


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup"):
        GraphedDenoiser(Affine(), warmup=0)


@pytest.mark.cuda
def test_graph_samples_equal_eager_samples():
    torch.manual_seed(0)
    den = Affine().cuda()
    cfg = PoolSamplerConfig(num_steps=8, num_candidates=3, divert_step=2, threshold=0.0)
    cond = torch.tensor([0.1, -0.2], device="cuda")
    x0 = torch.randn(2, 2, 4, 4, device="cuda")

    def run(d):
        g = torch.Generator(device="cuda").manual_seed(1)
        return PoolSampler(d, _sched(), lambda x, t, i: x.mean(dim=(1, 2, 3)), cfg).sample(cond, x0, g, seed=3)

    eager = run(den)
    graphed = GraphedDenoiser(den)
    fast = run(graphed)
    assert graphed.stats["captures"] == 2 and graphed.stats["replays"] > 0  # b rows and k*b rows
    assert torch.equal(eager.final, fast.final)
    assert torch.equal(eager.pairs.win, fast.pairs.win) and torch.equal(eager.pairs.lose, fast.pairs.lose)
    # under autograd the wrapper is eager (training forwards need the graph autograd records)
    x = torch.randn(2, 2, 4, 4, device="cuda", requires_grad=True)
    graphed(x, torch.full((2,), 10, device="cuda"), cond).sum().backward()
    assert x.grad is not None


@pytest.mark.cuda
def test_capture_failure_falls_back_to_eager(caplog):
    class Syncing(Affine):
        def forward(self, x, t, cond):
            if float(x.abs().max()) > 1e9:  # a host sync: not capturable
                return x
            return super().forward(x, t, cond)

    den = Syncing().cuda()
    graphed = GraphedDenoiser(den)
    x, t, c = torch.randn(2, 2, 4, 4, device="cuda"), torch.full((2,), 10, device="cuda"), torch.zeros(2, device="cuda")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spo_fast.cuda_graphs"):
        out1 = graphed(x, t, c)
        out2 = graphed(x, t, c)
    assert torch.allclose(out1, den(x, t, c)) and torch.allclose(out2, out1)
    assert graphed.stats["failures"] == 1 and graphed.num_graphs == 0
    assert sum("capture failed" in r.message for r in caplog.records) == 1
