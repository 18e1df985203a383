"""``report.png`` of a run folder: loss, valid-pair rate (and the head label audit), mean preference score per
timestep, held-out score."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["read_metrics", "write_report"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_report(run_dir: str | Path) -> Path:
    """Plot the run's metrics.jsonl into ``report.png`` (matplotlib, headless)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("the training report needs matplotlib: pip install matplotlib") from e
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_score" in r]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    it = [r["iteration"] for r in train]
    ax[0, 0].plot(it, [r["loss"] for r in train], label="loss")
    ax[0, 0].axhline(0.6931, ls=":", c="gray", label="log 2 (policy = reference)")
    ax[0, 0].set(title="SPO loss", xlabel="iteration")
    ax[0, 0].legend()
    ax[0, 1].plot(it, [r["valid_rate"] for r in train], c="C1", label="valid-pair rate")
    audits = [r for r in train if r.get("head_audit", {}).get("all", {}).get("agree_valid") is not None]
    if audits:  # preference.head_audit_every: the head's labels against the teacher on the policy's pools
        ax[0, 1].plot([r["iteration"] for r in audits], [r["head_audit"]["all"]["agree_valid"] for r in audits], "s--",
                      c="C3", label="head labels: teacher's valid pairs ordered alike (audit)")  # fmt: skip
        ax[0, 1].legend(fontsize=7)
    ax[0, 1].set(title="valid-pair rate" + (", head label audit" if audits else ""), xlabel="iteration",
                 ylim=(0, 1.05))  # fmt: skip
    per_t: dict[int, list[tuple[int, float]]] = {}
    for r in train:
        for t, v in r.get("score_per_timestep", {}).items():
            per_t.setdefault(int(t), []).append((r["iteration"], v))
    cmap = plt.get_cmap("viridis")
    ts = sorted(per_t, reverse=True)
    for j, t in enumerate(ts):
        xs, ys = zip(*per_t[t])
        ax[1, 0].plot(xs, ys, c=cmap(j / max(1, len(ts) - 1)), lw=1, label=f"t={t}" if j % 4 == 0 or t == 0 else None)
    ax[1, 0].set(title="mean pool score per timestep (sampling)", xlabel="iteration")
    ax[1, 0].legend(fontsize=7)
    if evals:
        ax[1, 1].plot([r["iteration"] for r in evals], [r["eval_score"] for r in evals], "o-", c="C2")
        ax[1, 1].set_title(f"held-out score: {evals[0]['eval_score']:.3f} -> {evals[-1]['eval_score']:.3f}")
    else:
        ax[1, 1].set_title("held-out score: no evaluation prompts")
    ax[1, 1].set_xlabel("iteration")
    fig.tight_layout()
    out = Path(run_dir) / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
