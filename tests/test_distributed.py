"""Multi-process training on CPU with gloo (2 ranks): the 2-rank update equals a 1-rank update on the union of the
same pairs, gathering with unequal pair counts, a run killed with SIGKILL and resumed equals the uninterrupted one,
DeepSpeed ZeRO-2 against DDP, and bad launches (unreachable master, mismatched configs, contradicting DeepSpeed
batch sizes) failing with one clear error on every rank.

Everything runs on tiny SD1.5-structured models (tests/tiny_models.py) with one thread per rank: CI has 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_pipeline

from spo_fast.distributed import is_deepspeed_available

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
PROMPTS = ["a red cat", "two dogs on a sofa", "a blue car", "green tree", "a yellow bird", "red and blue"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def red_minus_blue(images: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """An analytic step-aware "preference": redder images win (scaled so the softmax margins are not tiny)."""
    return 20.0 * (images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    pipe = make_tiny_pipeline(root / "sd15", "sd15")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([{"caption": c} for c in PROMPTS]))
    return {"root": root, "pipe": pipe, "prompts": prompts}


def _overrides(w: dict, out: Path, **extra) -> dict:
    o = {
        "model.pretrained": str(w["pipe"]), "model.kind": "sd15", "model.lora_rank": 4,
        "data.prompts": str(w["prompts"]), "data.eval_prompts": "",
        "sampling.batch_size": 3, "sampling.num_steps": 4, "sampling.divert_step": 1, "sampling.num_candidates": 2,
        "sampling.threshold": 0.0, "sampling.guidance_scale": 3.0,
        "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 2e-4, "train.device": "cpu", "train.iterations": 1,
        "log.output_dir": str(out), "log.progress": False,
    }  # fmt: skip
    o.update(extra)
    return o


# ------------------------------------------------------------------------------------------------ in-process ranks


def _rank_main(rank: int, port: int, w: dict, results: Path) -> None:
    """One rank of the spawned 2-rank session; writes what it saw to ``results/rank{rank}.pt``."""
    torch.set_num_threads(1)
    os.environ.update(_env(port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)))
    from spo_fast.config import make_config
    from spo_fast.distributed import DistributedError, gather_rows, init_distributed
    from spo_fast.sampler import PoolPairs
    from spo_fast.trainer import SPOTrainer

    out: dict = {}
    ctx = init_distributed("cpu", timeout_s=120, init_timeout_s=60)
    try:
        # 1. unequal counts: rank 0 has 3 pairs, rank 1 has 1 (and, in a second call, none at all)
        for counts in ((3, 1), (0, 2)):
            n = counts[rank]
            g = torch.Generator().manual_seed(rank)
            pairs = PoolPairs(
                parent_win=torch.randn(n, 4, 2, 2, generator=g), win=torch.randn(n, 4, 2, 2, generator=g),
                lose=torch.randn(n, 4, 2, 2, generator=g), timesteps=torch.full((n,), 100 * rank + 1),
                prompt_index=torch.arange(n) % 2, step_index=torch.arange(n), margin=torch.rand(n, generator=g),
            )  # fmt: skip
            joined, prompts = ctx.gather_pairs(pairs, [f"r{rank}p0", f"r{rank}p1"])
            out[f"gather_{counts}"] = {"pairs": vars(joined), "prompts": prompts, "local": vars(pairs)}
        odd = {"b": torch.tensor([True, False, True][: rank + 2]), "h": torch.randn(rank + 2, 3).bfloat16()}
        out["gather_rows"] = {"local": odd, "joined": gather_rows(odd, ctx)}

        # 2. one SPO iteration's sampling, gathering and training (grad_accum 2: no_sync on the first micro-step)
        cfg = make_config("toy", overrides=_overrides(w, results / "run"))
        tr = SPOTrainer(cfg, image_scorer=red_minus_blue, dist=ctx)
        out["init"] = {n: p.detach().clone() for n, p in tr.components.unet.named_parameters() if p.requires_grad}
        local, prompts, _ = tr.sample_pairs(0)
        pairs, prompts, _ = tr.gather_pairs(local, prompts)
        out["local_pairs"] = len(local)
        out["pairs"], out["prompts"] = vars(pairs), prompts
        out["logs"] = tr.train_on(pairs, prompts, 0)
        out["final"] = {n: p.detach().clone() for n, p in tr.components.unet.named_parameters() if p.requires_grad}
        out["opt_step"] = tr.opt_step

        # 4. the head refresh: each rank distils its own recorded gradients, the head's gradients are averaged
        head, buffer = _refresh_head_and_buffer(rank)
        refresher = _refresher(head)
        refresher.buffer, refresher.dist = buffer, ctx
        out["refresh_logs"] = refresher.update()
        out["refresh_head"] = {k: v.detach().clone() for k, v in head.state_dict().items()}

        # 3. bad input: ranks with different configs, and a DeepSpeed config with contradicting batch sizes
        for name, over, ds in (
            ("mismatch", {"train.lr": 2e-4 * (1 + rank)}, None),
            ("ds_batch", {}, {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}),
        ):
            t0 = time.perf_counter()
            try:
                bad = make_config("toy", overrides=_overrides(w, results / name, **over))
                SPOTrainer(bad, image_scorer=red_minus_blue, dist=ctx, deepspeed_config=ds)
                out[name] = None
            except DistributedError as e:
                out[name] = (str(e), time.perf_counter() - t0)
    except BaseException:
        out["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(out, results / f"rank{rank}.pt")
        ctx.close()


def _refresh_head_and_buffer(rank: int) -> tuple:
    """A small direction head (same weights on every rank) and 6 recorded steps of 2 pools, different per rank."""
    from spo_fast.head import HeadArchConfig, NoisyLatentPreferenceHead

    torch.manual_seed(0)
    head = NoisyLatentPreferenceHead(HeadArchConfig(encoder="direction", latent_channels=2, text_dim=3, width=8,
                                                    depth=1))  # fmt: skip
    g = torch.Generator().manual_seed(100 + rank)
    buffer = [{"mean": torch.randn(2, 2, 4, 4, generator=g), "parent_x0": torch.randn(2, 2, 4, 4, generator=g),
               "t": torch.tensor([500, 20]), "prompts": [f"r{rank}s{i}a", f"r{rank}s{i}b"],
               "grad": torch.randn(2, 2, 4, 4, generator=g)} for i in range(6)]  # fmt: skip
    return head, buffer


def _fake_encode(prompts: list[str]) -> torch.Tensor:
    """Prompt -> [1, 3] embedding, a fixed function of the text (so every process encodes a prompt the same way)."""
    return torch.tensor([[[len(p) / 10, p.count("a") / 3, float(p[1]) if p[1].isdigit() else 0.0]] for p in prompts])


def _refresher(head):
    from spo_fast.head import RefreshingHeadScorer

    class Differentiable:
        differentiable_score = staticmethod(red_minus_blue)

    return RefreshingHeadScorer(head, None, Differentiable(), None, _fake_encode, every=1, steps=3, lr=1e-2,
                                steps_per_batch=2, seed=7)  # fmt: skip


@pytest.fixture(scope="module")
def session(world):
    """Runs the 2-rank session once (spawned processes), then one rank alone on the union of its pairs."""
    import torch.multiprocessing as mp

    from spo_fast.config import make_config
    from spo_fast.sampler import PoolPairs
    from spo_fast.trainer import SPOTrainer

    results = world["root"] / "session"
    results.mkdir()
    t0 = time.perf_counter()
    mp.spawn(_rank_main, args=(_free_port(), world, results), nprocs=WORLD, join=True)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    spawn_s = time.perf_counter() - t0
    # The 1-rank reference: the same union of pairs in the same order, world_size 1 and a micro-batch that holds
    # both ranks' micro-batches (the shards are strided, so rank r's j-th micro-batch is every other entry of the
    # j-th block of WORLD * batch_size entries of the shared order).
    cfg = make_config("toy", overrides=_overrides(world, world["root"] / "single", **{"train.batch_size": 2 * WORLD}))
    single = SPOTrainer(cfg, image_scorer=red_minus_blue)
    init = {n: p.detach().clone() for n, p in single.components.unet.named_parameters() if p.requires_grad}
    pairs = PoolPairs(**ranks[0]["pairs"])
    logs = single.train_on(pairs, ranks[0]["prompts"], 0)
    final = {n: p.detach().clone() for n, p in single.components.unet.named_parameters() if p.requires_grad}
    print(f"\n2-rank session {spawn_s:.1f} s, 1-rank reference {time.perf_counter() - t0 - spawn_s:.1f} s")
    # The head refresh's 1-rank reference: one buffer whose step i holds both ranks' pools of step i (the ranks draw
    # the same step indices), so each batch is the union of the ranks' batches.
    head, buf0 = _refresh_head_and_buffer(0)
    _, buf1 = _refresh_head_and_buffer(1)
    union = [{k: (a[k] + b[k] if k == "prompts" else torch.cat([a[k], b[k]])) for k in a} for a, b in zip(buf0, buf1)]
    ref = _refresher(head)
    ref.buffer = union
    refresh = {"logs": ref.update(), "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
    return {"ranks": ranks, "init": init, "final": final, "logs": logs, "opt_step": single.opt_step,
            "refresh": refresh}  # fmt: skip


def test_two_rank_update_equals_one_rank_update_on_the_union(session):
    r0, r1 = session["ranks"]
    assert "error" not in r0 and "error" not in r1
    n = len(r0["pairs"]["win"])
    assert n == r0["local_pairs"] + r1["local_pairs"] and n % WORLD == 0, "every pair kept (even count)"
    for k, v in r0["pairs"].items():  # every rank holds the identical union
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1["pairs"][k]), k
    assert r0["prompts"] == r1["prompts"] and len(r0["prompts"]) == 6
    assert not torch.equal(r0["pairs"]["win"][:3], r0["pairs"]["win"][-3:]), "ranks must sample different prompts"
    # Same adapter on every rank (rank 0's broadcast) and in the one-rank run (LoRA init seeded by train.seed).
    for name, p in session["init"].items():
        assert torch.equal(r0["init"][name], p) and torch.equal(r1["init"][name], p)
    assert r0["opt_step"] == r1["opt_step"] == session["opt_step"] == 3
    err = max((r0["final"][k] - v).abs().max().item() for k, v in session["final"].items())
    moved = max((session["init"][k] - v).abs().max().item() for k, v in session["final"].items())
    rank_gap = max((r0["final"][k] - r1["final"][k]).abs().max().item() for k in session["final"])
    print(f"\n2-rank vs 1-rank max |dparam| = {err:.3g} (update size {moved:.3g}); ranks differ by {rank_gap:.3g}")
    assert moved > 1e-4, "the update must be visible for the comparison to mean anything"
    assert err <= 1e-6 and rank_gap == 0.0
    # The two setups run their forwards at different batch sizes (each rank's reference chunk holds half the pairs),
    # so the logged means agree to float rounding, not bit for bit (measured: 1e-6 relative on grad_norm).
    for key in ("loss", "ratio_win", "ratio_lose", "grad_norm"):
        assert abs(r0["logs"][key] - session["logs"][key]) <= 1e-5 * max(1.0, abs(session["logs"][key])), key
        assert r0["logs"][key] == r1["logs"][key]


def test_head_refresh_averages_the_heads_gradients_over_ranks(session):
    """preference.head_refresh on 2 ranks: each rank's head trains on its own recorded pools with the gradients
    averaged, so the heads stay identical and equal a 1-rank head trained on the union of the batches."""
    r0, r1 = session["ranks"]
    ref = session["refresh"]["head"]
    init, _ = _refresh_head_and_buffer(0)
    moved = max((v - ref[k]).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-3, "the update must be visible for the comparison to mean anything"
    for k, v in ref.items():
        assert torch.equal(r0["refresh_head"][k], r1["refresh_head"][k]), k
        torch.testing.assert_close(r0["refresh_head"][k], v, rtol=1e-5, atol=1e-6)


def test_gather_with_unequal_pair_counts(session):
    for counts in ((3, 1), (0, 2)):
        key = f"gather_{counts}"
        per_rank = [r[key] for r in session["ranks"]]
        joined = per_rank[0]["pairs"]
        assert len(joined["win"]) == sum(counts)
        for name in ("parent_win", "win", "lose", "timesteps", "step_index", "margin"):
            want = torch.cat([r["local"][name] for r in per_rank])
            assert torch.equal(joined[name], want) and joined[name].dtype == want.dtype, name
            assert torch.equal(per_rank[1]["pairs"][name], joined[name])
        # prompt_index moves onto the joined prompt list: rank 1's column j is entry 2 + j
        want_idx = torch.cat([r["local"]["prompt_index"] + 2 * i for i, r in enumerate(per_rank)])
        assert torch.equal(joined["prompt_index"], want_idx)
        assert per_rank[0]["prompts"] == ["r0p0", "r0p1", "r1p0", "r1p1"]
        assert joined["parent_lose"] is None
    rows = [r["gather_rows"] for r in session["ranks"]]
    joined, counts = rows[0]["joined"]
    assert counts == [2, 3]
    for name in ("b", "h"):  # bool and bfloat16 travel bitwise
        assert torch.equal(joined[name], torch.cat([r["local"][name] for r in rows]))
        assert joined[name].dtype == rows[0]["local"][name].dtype


def test_mismatched_configs_fail_on_every_rank(session):
    for r in session["ranks"]:
        msg, seconds = r["mismatch"]
        assert "config (config_hash) differs across ranks: rank 1 differs from rank 0" in msg, msg
        assert seconds < 30


def test_deepspeed_batch_contradiction_fails_on_every_rank(session):
    for r in session["ranks"]:
        msg, seconds = r["ds_batch"]
        assert "train_micro_batch_size_per_gpu=3 but train.batch_size = 2" in msg, msg
        assert "(on ranks 0, 1)" in msg
        assert seconds < 30


def test_deepspeed_config_checks():
    from spo_fast.distributed import DistributedError, load_deepspeed_config

    ds = load_deepspeed_config({"zero_optimization": {"stage": 2}}, 2, 3, 4, 1.0, lora=True)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 1.0
    with pytest.raises(DistributedError, match=r"train_batch_size=16 but train.batch_size \* train.grad_accum"):
        load_deepspeed_config({"train_batch_size": 16}, 2, 3, 4, 1.0, lora=True)
    with pytest.raises(DistributedError, match="gradient_accumulation_steps=1 but train.grad_accum = 3"):
        load_deepspeed_config({"gradient_accumulation_steps": 1}, 2, 3, 4, 1.0, lora=True)
    with pytest.raises(DistributedError, match="ZeRO-3 partitions the frozen base weights"):
        load_deepspeed_config({"zero_optimization": {"stage": 3}}, 2, 3, 4, 1.0, lora=True)
    with pytest.raises(DistributedError, match="remove the 'optimizer' section"):
        load_deepspeed_config({"optimizer": {"type": "Adam"}}, 2, 3, 4, 1.0, lora=True)
    for name in ("zero2_lora.json", "zero3_full.json"):
        ds = load_deepspeed_config(ROOT / "configs" / "deepspeed" / name, 2, 1, 2, 1.0, lora=name.startswith("zero2"))
        assert ds["train_batch_size"] == 4


# ------------------------------------------------------------------------------------------------ torchrun + CLI


ITERS = 6  # checkpoints every 2: the kill lands after the first one with room to spare


def _cli_args(w: dict, out: Path, iterations: int = ITERS) -> list[str]:
    o = _overrides(w, out, **{"train.iterations": iterations, "log.checkpoint_every": 2})
    o.pop("model.kind")
    args = ["--preset", "sd15", "--model.dtype", "fp32", "--train.mixed_precision", "no", "--model.vae", ""]
    for k, v in o.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    spm = ["--preference.backbone", str(w["spm"][0]), "--preference.processor", str(w["spm"][0]),
           "--preference.checkpoint", str(w["spm"][1])]  # fmt: skip
    return args + spm + ["--dist-timeout", "120", "--dist-init-timeout", "60"]


def _torchrun(args: list[str], port: int, module: str = "spo_fast.train", **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", module, *args]  # fmt: skip
    return subprocess.Popen(cmd, env=_env(port), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)  # fmt: skip


def _finish(p: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(p)
        out, _ = p.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{out[-4000:]}") from None
    assert p.returncode == 0, out[-6000:]
    return out


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (torchrun starts each worker in its own session, so killing
    torchrun's process group would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(p: subprocess.Popen) -> None:
    for pid in [p.pid, *_descendants(p.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return {r["iteration"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def cli_world(world):
    from spo_fast.preference import make_tiny_step_aware_model

    return {**world, "spm": make_tiny_step_aware_model(world["root"] / "spm")}


@pytest.fixture(scope="module")
def ddp_run(cli_world):
    """The uninterrupted 2-rank torchrun run (checkpoints every 2 iterations)."""
    out = cli_world["root"] / "ddp_full"
    t0 = time.perf_counter()
    log = _finish(_torchrun(_cli_args(cli_world, out), _free_port()))
    return {"out": out, "log": log, "s": time.perf_counter() - t0}


def test_torchrun_run_writes_from_rank_zero_only(ddp_run):
    out = ddp_run["out"]
    rows = _losses(out)
    assert sorted(rows) == list(range(1, ITERS + 1))
    assert all(r["pairs"] == 2 * 3 * 3 for r in rows.values()), "both ranks' pairs are gathered (3 prompts x 3 steps)"
    assert (out / "checkpoints" / "latest").read_text() == f"iter_{ITERS:06d}.pt"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "summary.json").is_file()
    state = torch.load(out / "checkpoints" / f"iter_{ITERS:06d}.pt", weights_only=False)
    assert state["world_size"] == WORLD and len(state["ledger_ranks"]) == WORLD
    assert ddp_run["log"].count('"output_dir"') == 1, "only rank 0 prints the summary"


def test_killed_and_resumed_run_equals_the_uninterrupted_one(cli_world, ddp_run):
    out = cli_world["root"] / "ddp_killed"
    args = _cli_args(cli_world, out)
    p = _torchrun(args, _free_port())
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert latest.is_file(), "no checkpoint appeared"
    _kill_tree(p)  # SIGKILL to torchrun and both ranks, mid-run
    p.communicate()
    killed_at = int(latest.read_text().split("_")[1].split(".")[0])
    assert killed_at < ITERS, "the run finished before the kill: the test proves nothing"
    _finish(_torchrun([*args, "--resume"], _free_port()))
    want, got = _losses(ddp_run["out"]), _losses(out)
    assert sorted(got) == list(range(1, ITERS + 1))
    diffs = [abs(got[i][k] - want[i][k]) for i in got for k in ("loss", "grad_norm", "ratio_win")]
    print(f"\nkilled after iteration {killed_at}; max |metric diff| after resume = {max(diffs):.3g}")
    for i in range(killed_at + 1, ITERS + 1):
        for k in ("loss", "grad_norm", "ratio_win", "ratio_lose", "pairs"):
            assert got[i][k] == pytest.approx(want[i][k], rel=1e-6, abs=1e-7), (i, k)


def test_compiled_ddp_matches_eager_ddp(cli_world, ddp_run):
    """--model.compile under torchrun: each rank compiles the DDP-wrapped UNet (dynamo splits the graph at DDP's
    gradient buckets); the first two iterations' losses and gradient norms are the eager run's. aot_eager traces the
    same graphs as inductor without code generation (bench_e2e.py times inductor)."""
    out = cli_world["root"] / "ddp_compile"
    args = [*_cli_args(cli_world, out, iterations=2), "--model.compile", "true", "--model.compile_backend", "aot_eager"]
    _finish(_torchrun(args, _free_port()), timeout=480)
    want, got = _losses(ddp_run["out"]), _losses(out)
    assert sorted(got) == [1, 2]
    for i in got:
        for k in ("loss", "grad_norm"):
            assert got[i][k] == pytest.approx(want[i][k], rel=1e-5, abs=1e-6), (i, k)


@pytest.mark.skipif(
    not is_deepspeed_available(), reason="deepspeed is not installed (pip install 'spo_fast[deepspeed]')"
)
def test_deepspeed_zero2_matches_ddp(cli_world, ddp_run):
    out = cli_world["root"] / "ds_zero2"
    args = [*_cli_args(cli_world, out), "--deepspeed", str(ROOT / "configs" / "deepspeed" / "zero2_lora.json")]
    _finish(_torchrun(args, _free_port()), timeout=300)
    want, got = _losses(ddp_run["out"]), _losses(out)
    assert sorted(got) == list(range(1, ITERS + 1))
    assert (out / "checkpoints" / "latest").read_text() == f"deepspeed/iter_{ITERS:06d}"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    diffs = {k: max(abs(got[i][k] - want[i][k]) for i in got) for k in ("loss", "grad_norm")}
    print(f"\nDeepSpeed ZeRO-2 vs DDP: max |diff| {diffs}")
    for i in got:
        assert got[i]["loss"] == pytest.approx(want[i]["loss"], rel=1e-4, abs=1e-5), i
        assert got[i]["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-3, abs=1e-5), i
    # DeepSpeed's own checkpoint (every rank's ZeRO shards) resumes: one more iteration on top.
    more = [*args, "--resume", "--train.iterations", str(ITERS + 1)]
    _finish(_torchrun(more, _free_port()), timeout=300)
    assert sorted(_losses(out)) == list(range(1, ITERS + 2))
    assert (out / "checkpoints" / "latest").read_text() == f"deepspeed/iter_{ITERS + 1:06d}"


def test_train_head_records_its_pools_on_every_rank(tmp_path):
    """README: `torchrun --nproc_per_node N -m spo_fast.train_head ...`: the ranks record the pool shards in turn,
    rank 0 joins them and trains; the joined data are bit for bit those of one process, and only rank 0 reports."""
    from spo_fast.train_head import main as train_head

    def args(out: Path) -> list[str]:
        return ["--log.output_dir", str(out), "--log.progress", "false", "--data.train_passes", "3",
                "--data.eval_passes", "2", "--data.shard_passes", "1", "--data.batch_size", "2",
                "--sampling.num_steps", "5", "--sampling.divert_step", "2", "--train.steps", "2",
                "--train.batch_pools", "4", "--train.threads", "1", "--train.device", "cpu"]  # fmt: skip

    log = _finish(_torchrun(args(tmp_path / "ranks"), _free_port(), module="spo_fast.train_head"))
    assert log.count('"heldout_agree_valid"') == 1, "only rank 0 trains and reports"
    assert train_head(args(tmp_path / "one")) == 0
    for split in ("train", "eval"):
        a = torch.load(tmp_path / "ranks" / f"data_{split}.pt", weights_only=False)
        b = torch.load(tmp_path / "one" / f"data_{split}.pt", weights_only=False)
        for k in ("latents", "timesteps", "prompt", "scores", "parent_x0", "grad"):
            assert torch.equal(a[k], b[k]), (split, k)
    assert not (tmp_path / "ranks" / "data_train.parts").exists()


def test_unreachable_master_fails_with_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    env = _env(port, WORLD_SIZE="2", RANK="1", LOCAL_RANK="0")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "spo_fast.train", "--train.device", "cpu", "--log.output_dir", str(tmp_path / "r"),
         "--dist-init-timeout", "3"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "could not create the gloo process group through 127.0.0.1" in r.stderr
    assert "within 3 s" in r.stderr and time.perf_counter() - t0 < 60


def test_world_size_without_master_fails_early(tmp_path):
    env = {k: v for k, v in _env(0, WORLD_SIZE="2", RANK="0").items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run(
        [sys.executable, "-m", "spo_fast.train", "--log.output_dir", str(tmp_path / "r")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "MASTER_ADDR and MASTER_PORT not set" in r.stderr, r.stderr[-2000:]


def test_missing_deepspeed_is_a_clear_error(monkeypatch):
    from spo_fast.distributed import DistributedError, require_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what a missing package looks like to import
    with pytest.raises(DistributedError, match=r"pip install 'spo_fast\[deepspeed\]'"):
        require_deepspeed()
