"""The command-line front end end to end on one device, as a user runs it: the checks a GPU machine needs
beyond the unit tests (which call the pieces in-process).

Runs, on the built-in toy world (no downloads), each as a subprocess:

1. ``python -m spo_fast.train`` for N iterations (checkpoint every N // 2), then ``--resume`` to N + 2;
2. the exported LoRA loaded with diffusers' ``StableDiffusionPipeline.load_lora_weights`` on the device (it must
   change the UNet's output);
3. ``python -m spo_fast.train_head`` (a short distillation), then ``python -m spo_fast.train`` with the head in
   verified mode, alone, and alone with the online refresh (``--preference.head_refresh 3``), 2 iterations each;
4. ``torchrun --nproc_per_node 1 -m spo_fast.train`` (the distributed path: NCCL on CUDA, gloo on CPU), 2 iterations.

Writes one JSON (each step's return code, seconds and the numbers it produced; a failed step keeps its stderr
tail) and exits non-zero if any step failed. ``--device cuda`` on a GPU machine; ``--device cpu`` to try it here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import environment, write_json

ROOT = Path(__file__).resolve().parent.parent


def _run(name: str, cmd: list[str], steps: list[dict[str, Any]], timeout: float) -> bool:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = 124, (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    step = {"step": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 2), "command": " ".join(cmd[1:])}
    if rc != 0:
        step["stderr_tail"] = err[-3000:]
    steps.append(step)
    print(f"{name}: rc {rc} in {step['seconds']} s", flush=True)
    if rc != 0:
        print(err[-3000:], file=sys.stderr, flush=True)
    return rc == 0


def _metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _lora_check(folder: Path, device: str) -> dict[str, Any]:
    """The exported LoRA through diffusers' own loader, on the device: it must change the UNet's output."""
    import torch
    from diffusers import StableDiffusionPipeline

    from spo_fast.toy import toy_model_path

    pipe = StableDiffusionPipeline.from_pretrained(toy_model_path()).to(device)
    unet = pipe.unet
    g = torch.Generator(device=device).manual_seed(0)
    size = unet.config.sample_size
    # in the UNet's dtype: the shipped toy pipeline is saved in fp16, which diffusers keeps on CUDA
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g, device=device).to(unet.dtype)
    emb = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g, device=device).to(unet.dtype)
    t = torch.tensor([500, 20], device=device)
    with torch.no_grad():
        base = unet(x, t, emb).sample
        pipe.load_lora_weights(folder)
        tuned = unet(x, t, emb).sample
    diff = (tuned - base).abs().max().item()
    return {"unet_output_change": diff, "adapters": list(unet.peft_config), "device": str(tuned.device)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cpu (train.device of every run)")
    ap.add_argument("--iterations", type=int, default=4, help="SPO iterations before the resume (which adds 2)")
    ap.add_argument("--head-steps", type=int, default=150, help="optimizer steps of the head distillation")
    ap.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts evaluated before and after")
    ap.add_argument("--step-timeout", type=float, default=300, help="seconds any one command may take")
    ap.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/cli_check.json)")
    args = ap.parse_args(argv)
    if args.iterations < 2:
        ap.error("--iterations must be at least 2 (a checkpoint is written half-way, then resumed)")
    py = sys.executable
    steps: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        common = [
            f"--train.device={args.device}", "--log.eval_every=0", f"--data.num_eval_prompts={args.eval_prompts}",
            "--log.progress=false",
        ]  # fmt: skip
        spo = work / "spo"
        base = [py, "-m", "spo_fast.train", *common]
        train = [*base, f"--log.output_dir={spo}"]
        n = args.iterations
        # a resumed run must keep the config (train.iterations aside): the same checkpoint interval both times
        train.append(f"--log.checkpoint_every={n // 2}")
        ok = _run("train", [*train, "--overwrite", f"--train.iterations={n}"], steps, args.step_timeout)
        ok = ok and _run("resume", [*train, "--resume", f"--train.iterations={n + 2}"], steps, args.step_timeout)
        rows = _metrics(spo)
        results["spo"] = {
            "iterations_logged": [r["iteration"] for r in rows],
            "loss": [r.get("loss") for r in rows],
            "pairs": [r.get("pairs") for r in rows],
        }
        summary = spo / "summary.json"
        if summary.is_file():
            results["spo"]["summary"] = json.loads(summary.read_text())
        if ok:
            t0 = time.perf_counter()
            try:
                results["lora"] = _lora_check(spo / "lora", args.device)
                good = results["lora"]["unet_output_change"] > 1e-6
                steps.append({"step": "load_lora_weights", "rc": 0 if good else 1,
                              "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            except Exception as exc:  # recorded, not raised: the other steps still run
                steps.append({"step": "load_lora_weights", "rc": 1, "error": repr(exc)})
            print(f"load_lora_weights: {results.get('lora')}", flush=True)

        head = work / "head"
        ok = _run(
            "train_head",
            [py, "-m", "spo_fast.train_head", "--overwrite", f"--log.output_dir={head}",
             f"--train.device={args.device}", "--data.train_passes=3", "--data.eval_passes=1",
             f"--train.steps={args.head_steps}",
             f"--log.checkpoint_every={max(1, args.head_steps // 2)}", "--log.eval_every=0", "--log.progress=false"],
            steps, args.step_timeout,
        )  # fmt: skip
        report = head / "report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            results["head"] = {"heldout_overall": rep.get("heldout", {}).get("overall")}
        if ok:
            for name, extra in (
                ("spo_verified_head", ["--preference.verify_head=true"]),
                ("spo_head_alone", ["--preference.verify_head=false"]),
                ("spo_head_refresh", ["--preference.head_refresh=3"]),  # teacher gradients through the policy
            ):
                folder = work / name
                _run(name, [*base, "--overwrite", "--train.iterations=2", f"--log.output_dir={folder}",
                            f"--preference.head={head / 'head.pt'}", *extra], steps, args.step_timeout)  # fmt: skip
                logged = _metrics(folder)
                results[name] = {"pairs": [r.get("pairs") for r in logged],
                                 "head_refresh_cos": [r.get("head_refresh_cos") for r in logged]}  # fmt: skip

        ddp = work / "ddp"
        _run(
            "torchrun_1proc",
            [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "spo_fast.train",
             *common, "--overwrite", "--train.iterations=2", f"--log.output_dir={ddp}"],
            steps, args.step_timeout,
        )  # fmt: skip
        results["ddp"] = {"pairs": [r.get("pairs") for r in _metrics(ddp)]}
    failed = [s["step"] for s in steps if s["rc"] != 0]
    payload = {"environment": environment(), "device": args.device, "steps": steps, "results": results,
               "failed": failed}  # fmt: skip
    path = write_json("cli_check", payload, args.out)
    print(f"wrote {path}; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
