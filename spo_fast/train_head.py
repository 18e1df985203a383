"""``python -m spo_fast.train_head``: distil the pixel-space preference (the teacher) into a noisy-latent preference
head (:mod:`spo_fast.head`).

    python -m spo_fast.train_head                                   # the toy world: ToyImageScorer teacher, CPU
    python -m spo_fast.train_head --model.encoder latent --log.output_dir outputs/head_latent
    python -m spo_fast.train_head --preset sd15 --teacher.checkpoint sd-v1-5_step-aware_preference_model.bin \\
        --data.prompts 4k_training_prompts.json                     # SD1.5, the official step-aware teacher
    python -m spo_fast.train_head --resume                          # continue an interrupted run
    torchrun --nproc_per_node 8 -m spo_fast.train_head --preset sd15 ...  # record the pools on 8 GPUs

``--preset toy|sd15|sdxl`` starts from the base model, teacher kind and pool settings (k, branching step, pair
threshold, lookahead) of ``python -m spo_fast.train``'s preset of that name, so the head is distilled on the pools
and the x0 estimate the SPO run will judge. Held-out prompts: ``data.eval_prompts`` or, when empty, every 10th prompt
of ``data.prompts`` (the toy world's held-out split for ``toy``), kept out of training.

Stages, each resumable: (1) sample SPO pools with the base model and the teacher on the training prompts and on
held-out prompts, recording candidates, timesteps, prompts and teacher scores, and for the direction head the
parent's x0 and the teacher's gradient at the pool mean (``data_train.pt``, ``data_eval.pt``; recorded in shards of
``data.shard_passes`` passes, which ``--resume`` keeps and torchrun's processes share); (2) train the head
(direction: gradient distillation, see :func:`spo_fast.head.direction_distillation_loss`; latent/unet: the pairwise
ranking loss over each pool) (``checkpoint.pt`` every
``log.checkpoint_every`` steps, written atomically); (3) evaluate held-out pairwise agreement per timestep bucket
and write ``head.pt``, ``report.json`` and ``report.png``. Settings: config file < ``--section.key value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .config import _coerce, _f, load_config_file

logger = logging.getLogger("spo_fast.train_head")

__all__ = ["HeadTrainConfig", "make_head_config", "HeadDistiller", "main"]


@dataclass
class HeadModelConfig:
    pretrained: str = _f("toy", "base diffusers pipeline (folder or hub id); 'toy' = the built-in toy base model")
    kind: str = _f("auto", "auto | sd15 | sdxl")
    dtype: str = _f("fp32", "weights dtype of the frozen base model")
    encoder: str = _f(
        "direction",
        "direction (pool-level teacher-gradient head, runs on b pool means) | latent (small conv encoder per "
        "candidate) | unet (frozen base UNet encoder + block per candidate)",
    )
    width: int = _f(32, "channels of the head's feature map")
    depth: int = _f(3, "adaLN residual blocks (the unet encoder uses depth // 2 on top of the UNet features)")
    downsample: int = _f(0, "stride-2 stages of the latent encoder (SD1.5 64x64 latents: 2)")
    embed_dim: int = _f(128, "joint image/text embedding width")
    levels: list = _f([1, 2, 4], "pyramid pooling grid sizes of the tail")
    potential: bool = _f(
        True,
        "direction encoder: the direction is the latent gradient of a learned scalar potential (conservative, as the "
        "teacher's gradient; toy world: +3-5 points in (500,750]; training takes a double backward, ~3x the step "
        "time); false: a free latent-shaped output. Per-candidate encoders (latent, unet) have no direction",
    )
    score_rule: str = _f(
        "auto",
        "direction encoder: how candidates are scored: gradient (first order <g(mean), x_i - mean>, the net runs on "
        "the b pool means) | value (a potential head's scalar at each candidate, k*b rows; toy world +1.4 points, "
        "+2.4 in (500,750]) | auto (value for a potential head)",
    )


@dataclass
class HeadTeacherConfig:
    kind: str = _f("toy", "toy (analytic scorer of decoded x0) | step_aware (official SPM checkpoint)")
    backbone: str = _f("yuvalkirstain/PickScore_v1", "CLIP backbone of the step-aware model")
    processor: str = _f("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP processor of the step-aware model")
    checkpoint: str = _f("", "official step-aware preference model checkpoint")


@dataclass
class HeadDataConfig:
    prompts: str = _f("toy", "training prompts: a file or 'toy' (toy train split)")
    eval_prompts: str = _f(
        "", "held-out prompts: a file, 'toy' (toy held-out split), or empty: every 10th prompt of data.prompts"
    )
    column: str = _f("", "prompt column of json/csv/parquet files")
    train_passes: int = _f(48, "sampling passes on training prompts (pools = passes * batch * scored steps)")
    eval_passes: int = _f(6, "sampling passes on held-out prompts")
    rank_passes: int = _f(
        0,
        "direction head with train.rank_weight: extra sampling passes on training prompts recorded without teacher "
        "gradients (scores and parent x0 only: a third of a midpoint pass's time on the toy world); the ranking "
        "term then draws its pools from these and the gradient-recorded ones",
    )
    batch_size: int = _f(8, "prompts per sampling pass")
    shard_passes: int = _f(
        16,
        "passes per recorded shard (data_<split>.parts/): an interrupted recording resumes after its last finished "
        "shard, and under torchrun the processes record the shards in turn",
    )
    gradient_at: str = _f(
        "mean",
        "direction head target: the teacher's gradient at the pool mean, or 'midpoints' (the mean of its gradients "
        "at the k midpoints between mean and candidates: a smoother, better-ranking target; k times the gradient "
        "passes while recording)",
    )


@dataclass
class HeadSamplingConfig:
    num_steps: int = _f(20, "DDIM steps")
    eta: float = _f(1.0, "DDIM stochasticity")
    guidance_scale: float = _f(5.0, "CFG scale while sampling pools")
    num_candidates: int = _f(4, "k: candidates per pool")
    divert_step: int = _f(4, "first branching step")
    threshold: float = _f(
        0.05,
        "SPO pair threshold (agreement is reported on pairs the teacher calls valid); "
        "use the trainer's: toy 0.05, sd15/sdxl 0.3",
    )
    lookahead_steps: int = _f(
        2, "deterministic DDIM jumps of the teacher's x0 estimate (as sampling.lookahead_steps of the trainer; toy 2)"
    )


@dataclass
class HeadOptimConfig:
    steps: int = _f(2000, "optimizer steps")
    batch_pools: int = _f(64, "pools per step")
    lr: float = _f(2e-3, "AdamW learning rate (cosine decay to 5%)")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    rank_weight: float = _f(
        0.0,
        "direction head: weight of the pool ranking loss on the teacher's scores (by the head's scoring rule: a "
        "potential's values) added to gradient distillation",
    )
    rank_min_timestep: int = _f(
        0, "direction head: the ranking loss only on pools scored above this timestep (0: every pool)"
    )
    init_head: str = _f(
        "",
        "start from this trained head.pt (a warm start, e.g. fine-tuning with the ranking term; its model.* settings "
        "must match this run's) instead of a fresh initialisation",
    )
    seed: int = _f(0, "seed of sampling, initialisation and batches")
    device: str = _f("auto", "auto | cpu | cuda")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")


@dataclass
class HeadLogConfig:
    output_dir: str = _f("outputs/head_toy", "run folder: data, checkpoint, head.pt, report.json/png")
    checkpoint_every: int = _f(250, "optimizer steps between checkpoints")
    eval_every: int = _f(500, "optimizer steps between held-out evaluations (0: only at the end)")
    progress: bool = _f(True, "tqdm progress bars")


@dataclass
class HeadTrainConfig:
    model: HeadModelConfig = field(default_factory=HeadModelConfig)
    teacher: HeadTeacherConfig = field(default_factory=HeadTeacherConfig)
    data: HeadDataConfig = field(default_factory=HeadDataConfig)
    sampling: HeadSamplingConfig = field(default_factory=HeadSamplingConfig)
    train: HeadOptimConfig = field(default_factory=HeadOptimConfig)
    log: HeadLogConfig = field(default_factory=HeadLogConfig)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(HeadTrainConfig)}  # type: ignore[misc]


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in fields(cls)]


def apply_head_overrides(cfg: HeadTrainConfig, overrides: dict[str, Any]) -> HeadTrainConfig:
    for key, value in overrides.items():
        if isinstance(value, dict):
            for k, v in value.items():
                apply_head_overrides(cfg, {f"{key}.{k}": v})
            continue
        parts = key.split(".")
        if len(parts) != 2 or not hasattr(cfg, parts[0]) or not hasattr(getattr(cfg, parts[0]), parts[1]):
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(_valid_keys())}")
        sec = getattr(cfg, parts[0])
        setattr(sec, parts[1], _coerce(value, getattr(sec, parts[1]), key))
    return cfg


def _head_presets() -> dict[str, dict[str, dict[str, Any]]]:
    """The trainer's presets as head-distillation starting values: the same base model, teacher kind and pool
    settings. Why: a head is only as right as the pools and x0 estimates it was distilled on; a head trained with the
    toy world's 2-jump lookahead and 0.05 threshold would judge something else than an SD1.5 run's teacher does."""
    from .config import PRESETS

    out: dict[str, dict[str, dict[str, Any]]] = {"toy": {}}
    for name in ("sd15", "sdxl"):
        pre = PRESETS[name]
        sampling = {k: pre["sampling"][k] for k in ("num_candidates", "divert_step", "threshold")}
        out[name] = {
            "model": {"pretrained": pre["model"]["pretrained"], "kind": pre["model"]["kind"]},
            "teacher": {"kind": pre["preference"]["kind"]},
            "data": {"prompts": pre["data"]["prompts"]},
            "sampling": sampling | {"lookahead_steps": pre["sampling"].get("lookahead_steps", 1)},
            "log": {"output_dir": f"outputs/head_{name}"},
        }
    return out


def make_head_config(
    file: str | Path | None = None, overrides: dict[str, Any] | None = None, preset: str = "toy"
) -> HeadTrainConfig:
    """The preset's values (``toy`` = the defaults; ``sd15`` / ``sdxl`` as :func:`_head_presets`), then the
    YAML/JSON file, then the overrides (later wins)."""
    presets = _head_presets()
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    cfg = apply_head_overrides(HeadTrainConfig(), presets[preset])
    if file:
        apply_head_overrides(cfg, load_config_file(file))
    return apply_head_overrides(cfg, overrides or {})


def _hash(d: dict[str, Any], sections: tuple[str, ...]) -> str:
    # Settings added since a run folder was written take their defaults: a newer spo_fast resumes an older run.
    default = dataclasses.asdict(HeadTrainConfig())
    sub = {k: {**default[k], **d.get(k, {})} for k in sections}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def _train_and_heldout_prompts(data: HeadDataConfig) -> tuple[list[str], list[str]]:
    """Training and held-out prompts. Without ``data.eval_prompts``, every 10th prompt of a file is held out (spread
    over the file: prompt files are often sorted) and the rest trains; the toy world has its own held-out split."""
    from .trainer import _load_prompts

    if data.eval_prompts or data.prompts == "toy":
        spec = data.eval_prompts or "toy"
        return _load_prompts(data.prompts, data.column, "train"), _load_prompts(spec, data.column, "heldout")
    prompts = _load_prompts(data.prompts, data.column, "train")
    if len(prompts) < 2:
        raise ValueError(
            f"data.prompts {data.prompts!r} holds {len(prompts)} prompt(s): too few to hold every 10th out for the "
            "agreement check; pass more prompts or a held-out file with --data.eval_prompts"
        )
    held_out = set(range(9, len(prompts), 10)) if len(prompts) >= 10 else {len(prompts) - 1}
    held = [p for i, p in enumerate(prompts) if i in held_out]
    train = [p for i, p in enumerate(prompts) if i not in held_out]
    logger.info("held out %d of %d prompts (every 10th) for the agreement check", len(held), len(prompts))
    return train, held


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class HeadDistiller:
    """Owns the base model, the teacher, the data and the head for one distillation run (see the module docstring)."""

    def __init__(
        self, cfg: HeadTrainConfig, resume: bool = False, overwrite: bool = False, dist: Any | None = None
    ) -> None:
        """``dist``: a :class:`~spo_fast.distributed.DistributedContext` (torchrun): every process records its share
        of the pools' shards on its own device, and rank 0 alone trains the head and writes the results."""
        from .distributed import DistributedContext, digest
        from .head import HeadArchConfig, NoisyLatentPreferenceHead, scheduler_signature
        from .pipeline import PromptEncoder, load_components
        from .precision import resolve_dtype
        from .sampler import PoolSamplerConfig

        self.cfg = cfg
        s = cfg.sampling
        self.sampler_config = PoolSamplerConfig(
            s.num_steps, s.num_candidates, s.divert_step, 0, s.threshold, s.eta, lookahead_steps=s.lookahead_steps
        )
        self.sampler_config.validate()
        if cfg.teacher.kind not in ("toy", "step_aware"):
            raise ValueError(f"teacher.kind must be toy or step_aware, got {cfg.teacher.kind!r}")
        if cfg.teacher.kind == "step_aware" and not cfg.teacher.checkpoint:
            raise ValueError("teacher.kind=step_aware needs teacher.checkpoint (the official step-aware model)")
        if cfg.data.gradient_at not in ("mean", "midpoints"):
            raise ValueError(f"data.gradient_at must be mean or midpoints, got {cfg.data.gradient_at!r}")
        positive = ("train.steps", "train.batch_pools", "data.train_passes", "data.eval_passes", "data.batch_size",
                    "data.shard_passes")  # fmt: skip
        for key in positive:
            sec, k = key.split(".")
            if getattr(getattr(cfg, sec), k) < 1:
                raise ValueError(f"{key} must be >= 1")
        if cfg.data.rank_passes < 0:
            raise ValueError(f"data.rank_passes must be >= 0, got {cfg.data.rank_passes}")
        if cfg.data.rank_passes and (cfg.model.encoder != "direction" or not cfg.train.rank_weight):
            raise ValueError(
                "data.rank_passes feeds the ranking term of a direction head: set --train.rank_weight > 0 (e.g. 0.5) "
                "with --model.encoder direction; a latent/unet head learns by ranking alone: raise data.train_passes"
            )
        if cfg.train.rank_weight < 0 or cfg.train.rank_min_timestep < 0:
            raise ValueError(
                f"train.rank_weight and train.rank_min_timestep must be >= 0 (got {cfg.train.rank_weight}, "
                f"{cfg.train.rank_min_timestep})"
            )
        # The head's own settings, checked before the run folder is written (the base model's sizes come later).
        HeadArchConfig(
            encoder=cfg.model.encoder, width=cfg.model.width, depth=cfg.model.depth, embed_dim=cfg.model.embed_dim,
            potential=cfg.model.potential and cfg.model.encoder == "direction", score_rule=cfg.model.score_rule,
        ).validate()  # fmt: skip
        if cfg.train.init_head:
            self._check_init_head(cfg.train.init_head)
        self.dist = dist if dist is not None else DistributedContext()
        self.dist.check_same(
            "train_head config", digest(dataclasses.asdict(cfg)), "launch every process with the same settings"
        )
        self.out = Path(cfg.log.output_dir)
        error = None
        if self.dist.is_main:  # one process owns the run folder; the others wait for its verdict
            try:
                self._check_output(resume, overwrite)
            except ValueError as e:
                error = str(e)
        self.dist.agree(error)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        dev = cfg.train.device
        self.device = self.dist.device if self.dist.enabled else torch.device(
            "cuda" if dev == "auto" and torch.cuda.is_available() else "cpu" if dev == "auto" else dev
        )  # fmt: skip
        pretrained = cfg.model.pretrained
        if pretrained == "toy":
            from .toy import toy_model_path

            pretrained = str(toy_model_path())
        self.pretrained = pretrained
        kind = None if cfg.model.kind == "auto" else cfg.model.kind
        self.components = load_components(
            pretrained, kind, resolve_dtype(cfg.model.dtype, self.device), device=self.device
        )
        self.encoder = PromptEncoder(self.components, device=self.device)
        self.train_prompts, self.eval_prompts = _train_and_heldout_prompts(cfg.data)
        text_dim = sum(int(e.config.hidden_size) for e in self.components.text_encoders)
        arch = HeadArchConfig(
            encoder=cfg.model.encoder,
            latent_channels=int(self.components.unet.config.in_channels),
            text_dim=text_dim,
            width=cfg.model.width,
            depth=cfg.model.depth,
            downsample=cfg.model.downsample,
            embed_dim=cfg.model.embed_dim,
            levels=list(cfg.model.levels),
            potential=cfg.model.potential and cfg.model.encoder == "direction",  # per-candidate heads score directly
            score_rule=cfg.model.score_rule,
            scheduler=scheduler_signature(self.components.scheduler),
            base_model=cfg.model.pretrained,
        )
        torch.manual_seed(cfg.train.seed)
        self.head = NoisyLatentPreferenceHead(arch, unet=self.components.unet).to(self.device)
        if cfg.train.init_head:
            from .head import load_head

            # load_head checks it against this base model (latent channels, text width, scheduler).
            init = load_head(cfg.train.init_head, self.components, pretrained=cfg.model.pretrained)
            self.head.load_state_dict(init.state_dict())
        self.optimizer = torch.optim.AdamW(
            [p for p in self.head.parameters() if p.requires_grad], lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
        )  # fmt: skip
        steps = cfg.train.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda i: 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(min(i, steps) / steps * torch.pi)).item()),
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        if resume:
            self._load_checkpoint()

    def _check_init_head(self, path: str) -> None:
        """train.init_head: the file is a head whose architecture is this run's model.* (checked before any work)."""
        from .head import HEAD_VERSION

        if not Path(path).is_file():
            raise FileNotFoundError(f"train.init_head: no head at {path} (the head.pt of a finished train_head run)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("version") != HEAD_VERSION or "config" not in state:
            raise ValueError(f"train.init_head: {path} is not a spo_fast head checkpoint (version {HEAD_VERSION})")
        m, have = self.cfg.model, state["config"]
        want = {"encoder": m.encoder, "width": m.width, "depth": m.depth, "embed_dim": m.embed_dim,
                "downsample": m.downsample, "levels": list(m.levels),
                "potential": m.potential and m.encoder == "direction"}  # fmt: skip
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            parts = ", ".join(f"model.{k}: head {a!r} vs run {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"train.init_head: {path} has another architecture ({parts}): set model.* to the head's")

    # ------------------------------------------------------------------------------------------- run folder
    def _check_output(self, resume: bool, overwrite: bool) -> None:
        import shutil

        d = dataclasses.asdict(self.cfg)
        path = self.out / "config.json"
        if path.is_file() and not overwrite:
            old = json.loads(path.read_text())
            if _hash(old, ("model", "teacher", "data", "sampling", "train")) != _hash(
                d, ("model", "teacher", "data", "sampling", "train")
            ):
                raise ValueError(
                    f"{self.out} holds a head run with a different config: choose another --log.output_dir or pass "
                    "--overwrite"
                )
            if not resume:
                raise ValueError(f"{self.out} already holds this run: pass --resume to continue it or --overwrite")
        elif resume and not path.is_file():
            raise ValueError(f"--resume given but {self.out} holds no head run (no config.json)")
        if overwrite and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_text(path, json.dumps(d, indent=2))

    def _load_checkpoint(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            logger.info("no checkpoint in %s: training starts at step 0 (recorded data is reused)", self.out)
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.head.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.history = state["step"], state["history"]
        logger.info("resumed head training at step %d", self.step)

    def _save_checkpoint(self) -> None:
        from .head import save_head

        save_head(self.head, self.out / "checkpoint.pt", {
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
            "step": self.step, "history": self.history,
        })  # fmt: skip

    # ------------------------------------------------------------------------------------------- stages
    def _shards(self, split: str) -> list[tuple[int, int]]:
        """The pass ranges of ``split``'s shards (``data.shard_passes`` passes each)."""
        d = self.cfg.data
        passes = {"train": d.train_passes, "eval": d.eval_passes, "rank": d.rank_passes}[split]
        return [(a, min(a + d.shard_passes, passes)) for a in range(0, passes, d.shard_passes)]

    def _shard_path(self, split: str, shard: tuple[int, int]) -> Path:
        return self.out / f"data_{split}.parts" / f"passes_{shard[0]:06d}-{shard[1]:06d}.pt"

    def record(self, split: str) -> None:
        """Record this process's shards of ``split`` (all of them in a single process) that are not on disk yet. The
        rank split (``data.rank_passes``) is recorded without teacher gradients, with the parent x0."""
        from .head import collect_pools
        from .trainer import atomic_save

        if (self.out / f"data_{split}.pt").is_file():
            return
        cfg = self.cfg
        direction = cfg.model.encoder == "direction"
        prompts = self.eval_prompts if split == "eval" else self.train_prompts
        passes = {"train": cfg.data.train_passes, "eval": cfg.data.eval_passes, "rank": cfg.data.rank_passes}[split]
        seed = cfg.train.seed + {"train": 0, "eval": 7919, "rank": 104729}[split]  # distinct pools per split
        for i, shard in enumerate(self._shards(split)):
            path = self._shard_path(split, shard)
            if i % self.dist.world_size != self.dist.rank or path.is_file():
                continue
            t0 = time.perf_counter()
            rec = collect_pools(
                self.components, self.encoder, self._teacher(), prompts, passes, cfg.data.batch_size,
                self.sampler_config, cfg.sampling.guidance_scale, seed=seed, device=self.device,
                progress=cfg.log.progress, gradients=direction and split != "rank",
                gradient_at=cfg.data.gradient_at, parents=split == "rank", pass_range=shard,
            )  # fmt: skip
            atomic_save(rec.state_dict(), path)
            logger.info("recorded %d %s pools (passes %d-%d of %d) in %.1f s", len(rec), split, shard[0],
                        shard[1] - 1, passes, time.perf_counter() - t0)  # fmt: skip

    def collect(self, split: str) -> Any:
        """Teacher pools of ``split`` (train / eval / rank): loaded from the run folder when already joined, else the
        missing shards recorded and all of them joined into ``data_<split>.pt`` (and the shards removed)."""
        import shutil

        from .head import PoolRecord
        from .trainer import atomic_save

        path = self.out / f"data_{split}.pt"
        if path.is_file():
            return PoolRecord(**torch.load(path, map_location="cpu", weights_only=False))
        if not self.dist.enabled:
            self.record(split)
        shards = [self._shard_path(split, s) for s in self._shards(split)]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:  # a process of a distributed recording failed before its shards were written
            raise ValueError(
                f"{shards[0].parent} lacks {len(missing)} of its {len(shards)} shards ({missing[0]}, ...): a recording "
                "process stopped early; run the same command with --resume to record them"
            )
        rec = PoolRecord.cat([PoolRecord(**torch.load(p, map_location="cpu", weights_only=False)) for p in shards])
        atomic_save(rec.state_dict(), path)
        shutil.rmtree(shards[0].parent)
        return rec

    def _teacher(self) -> Any:
        if not hasattr(self, "_teacher_model"):
            t = self.cfg.teacher
            if t.kind == "toy":
                from .toy import ToyImageScorer

                self._teacher_model = ToyImageScorer()
            else:
                from .preference import StepAwarePreferenceModel

                self._teacher_model = StepAwarePreferenceModel.from_pretrained(
                    backbone=t.backbone, checkpoint=t.checkpoint, processor=t.processor or None
                ).to(self.device).eval()  # fmt: skip
        return self._teacher_model

    def _embeds(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder(prompts).embeds.float()

    def train(self, data: Any, eval_data: Any, rank_data: Any | None = None) -> None:
        """Optimise the head on ``data`` (``rank_data``: extra score-only pools for the ranking term)."""
        from tqdm.auto import tqdm

        from .head import direction_distillation_loss, pool_ranking_loss

        cfg = self.cfg.train
        k = data.latents.shape[1]
        embeds = self._embeds(data.prompts).to(self.device)
        if rank_data is not None and rank_data.parent_x0 is None:
            raise ValueError(f"{self.out}/data_rank.pt has no parent x0: delete it to record it again")
        # The score-only pools' prompt rows; None: the same prompt list as the training pools (the usual case).
        rank_embeds = None
        if rank_data is not None and rank_data.prompts != data.prompts:
            rank_embeds = self._embeds(rank_data.prompts).to(self.device)
        enc_unet = self.head.config.encoder == "unet"
        direction = self.head.config.encoder == "direction"
        if direction and data.grad is None:
            raise ValueError(f"{self.out}/data_train.pt has no teacher gradients: record it again for a direction head")
        self.head.train()
        bar = tqdm(range(self.step, cfg.steps), initial=self.step, total=cfg.steps, desc="head",
                   disable=not self.cfg.log.progress)  # fmt: skip
        for step in bar:
            # Batches keyed by (seed, step): a resumed run draws exactly the batches the uninterrupted one would.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(data), (cfg.batch_pools,), generator=g)
            text = self.head.text_features(embeds)
            if direction:
                cand = data.latents[idx].to(self.device).transpose(0, 1)
                pi, ts = data.prompt[idx].to(self.device), data.timesteps[idx].to(self.device)
                parent = data.parent_x0[idx].to(self.device)
                gdir = self.head.direction(cand.mean(0), parent, ts, text[pi])
                loss = direction_distillation_loss(gdir, data.grad[idx].to(self.device))
                if cfg.rank_weight and rank_data is not None:
                    batch = self._rank_batch(data, rank_data, text, rank_embeds, g)
                    loss = loss + cfg.rank_weight * self._ranking_loss(*batch)
                elif cfg.rank_weight:
                    target = data.scores[idx].to(self.device)
                    loss = loss + cfg.rank_weight * self._ranking_loss(cand, parent, ts, text[pi], target, gdir)
            else:
                lat = data.latents[idx].to(self.device).flatten(0, 1)
                pidx = data.prompt[idx].to(self.device).repeat_interleave(k)
                ts = data.timesteps[idx].to(self.device).repeat_interleave(k)
                scores = self.head(lat, ts, text, pidx, embeds[pidx] if enc_unet else None).view(-1, k)
                loss = pool_ranking_loss(scores, data.scores[idx].to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.step = step + 1
            rec: dict[str, Any] = {"step": self.step, "loss": loss.item()}
            ev = self.cfg.log.eval_every
            if ev and self.step % ev == 0 and self.step < cfg.steps:
                rec["eval"] = self.evaluate(eval_data)
                self.head.train()
            self.history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if self.step % self.cfg.log.checkpoint_every == 0 or self.step == cfg.steps:
                self._save_checkpoint()

    def _rank_batch(
        self, data: Any, rank_data: Any, text: torch.Tensor, rank_embeds: torch.Tensor | None, g: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        """The ranking term's own batch, drawn from the gradient-recorded and the score-only pools together. Why a
        separate draw: the score-only pools are the larger, cheaper set; ranking only the gradient batch would leave
        them unused."""
        dev = self.device
        idx = torch.randint(0, len(data) + len(rank_data), (self.cfg.train.batch_pools,), generator=g)
        a, b = idx[idx < len(data)], idx[idx >= len(data)] - len(data)
        rank_text = text if rank_embeds is None else self.head.text_features(rank_embeds)

        def both(name: str) -> torch.Tensor:
            return torch.cat([getattr(data, name)[a], getattr(rank_data, name)[b]]).to(dev)

        tf = torch.cat([text[data.prompt[a].to(dev)], rank_text[rank_data.prompt[b].to(dev)]])
        return both("latents").transpose(0, 1), both("parent_x0"), both("timesteps"), tf, both("scores")

    def _ranking_loss(
        self, cand: torch.Tensor, parent: torch.Tensor, ts: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
        gdir: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The pool ranking loss of ``cand [k, n, ...]`` against the teacher's ``target [n, k]`` on the pools above
        ``train.rank_min_timestep``, by the rule the sampler will use (a potential's values, or first order with
        the pools' directions ``gdir``, computed here when not given)."""
        from .head import direction_scores, pool_ranking_loss

        keep = ts > self.cfg.train.rank_min_timestep
        if not bool(keep.any()):
            return cand.new_zeros(())
        if self.head.scores_by_value:
            scores = self.head.potential_values(cand[:, keep], parent[keep], ts[keep], text[keep])
        else:
            if gdir is None:
                gdir = self.head.direction(cand.mean(0), parent, ts, text)
            scores = direction_scores(cand[:, keep], gdir[keep])
        return pool_ranking_loss(scores.t(), target[keep])

    def evaluate(self, data: Any) -> dict[str, Any]:
        from .head import evaluate_agreement

        return evaluate_agreement(self.head, data, self._embeds(data.prompts), self.cfg.sampling.threshold)

    def run(self) -> dict[str, Any] | None:
        """Record (or load) the pools, train, evaluate; the report (None on the ranks other than 0 under torchrun)."""
        from .head import save_head

        t0 = time.perf_counter()
        splits = ["train", "eval"] + (["rank"] if self.cfg.data.rank_passes else [])
        if self.dist.enabled:
            for split in splits:
                self.record(split)
            # Every process's shards are on disk: the group ends here, and rank 0 alone joins them and trains the
            # (small) head, so no process waits on a collective through the training.
            self.dist.barrier()
            self.dist.close(barrier=False)
            if not self.dist.is_main:
                return None
        data = self.collect("train")
        eval_data = self.collect("eval")
        rank_data = self.collect("rank") if self.cfg.data.rank_passes else None
        t_data = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.train(data, eval_data, rank_data)
        t_train = time.perf_counter() - t1
        result = self.evaluate(eval_data)
        if not result["overall"]["teacher_valid"]:
            # Why a warning, not an error: the head is trained and saved all the same; only its check is missing.
            logger.warning(
                "no held-out pool has a pair the teacher calls valid at sampling.threshold %s, so the head's agreement "
                "is undefined: record more held-out pools (--data.eval_passes) or use the threshold your SPO run "
                "uses (toy 0.05, sd15/sdxl 0.3)",
                self.cfg.sampling.threshold,
            )
        train_fit = self.evaluate(data.subset(slice(0, min(len(data), len(eval_data)))))
        s = self.cfg.sampling
        distillation = {  # what the head learned to judge: the trainer warns when its run judges something else
            "teacher": self.cfg.teacher.kind, "lookahead_steps": s.lookahead_steps, "num_candidates": s.num_candidates,
            "threshold": s.threshold, "guidance_scale": s.guidance_scale, "num_steps": s.num_steps,
        }  # fmt: skip
        head_path = save_head(self.head, self.out / "head.pt", {"agreement": result, "distillation": distillation})
        n_params = sum(p.numel() for p in self.head.parameters())
        report = {
            "head": str(head_path),
            "encoder": self.head.config.encoder,
            "trainable_parameters": n_params,
            "train_pools": len(data),
            "eval_pools": len(eval_data),
            "rank_pools": len(rank_data) if rank_data is not None else 0,
            "steps": self.step,
            "seconds_data": t_data,
            "seconds_train": t_train,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "heldout": result,
            "train_subset": train_fit,
            "history": [{"step": h["step"], "loss": h["loss"]} for h in self.history],
            "eval_history": [{"step": h["step"], **h["eval"]["overall"]} for h in self.history if "eval" in h],
        }
        _atomic_text(self.out / "report.json", json.dumps(report, indent=2))
        write_head_report(report, self.out / "report.png")
        return report


def write_head_report(report: dict[str, Any], path: Path) -> Path:
    """Loss curve and held-out agreement per timestep bucket (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    h = report["history"]
    ax[0].plot([r["step"] for r in h], [r["loss"] for r in h], lw=0.8)
    ax[0].set(title=f"training loss ({report['encoder']} head)", xlabel="step", yscale="log")
    b = report["heldout"]["buckets"]
    names = list(b)
    vals = [b[n]["agree_valid"] or 0.0 for n in names]
    allp = [b[n]["agree_all_pairs"] or 0.0 for n in names]
    x = range(len(names))
    ax[1].bar([i - 0.2 for i in x], vals, 0.4, label="teacher-valid best/worst pair")
    ax[1].bar([i + 0.2 for i in x], allp, 0.4, label="all pool pairs")
    ax[1].axhline(0.85, ls=":", c="gray", label="target 0.85")
    ax[1].set_xticks(list(x), names, rotation=30, fontsize=8)
    ov = report["heldout"]["overall"]
    agree = "n/a (no valid pair)" if ov["agree_valid"] is None else f"{ov['agree_valid']:.3f}"
    ax[1].set(title=f"held-out agreement ({report['encoder']}): {agree} on valid pairs",
              ylim=(0, 1.05), xlabel="timestep bucket")  # fmt: skip
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def field_help() -> dict[str, str]:
    out = {}
    for sec, cls in _sections().items():
        for f in fields(cls):
            out[f"{sec}.{f.name}"] = f"{f.metadata.get('help', '')} [{type(f.default).__name__}]"
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spo_fast.train_head", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset", default="toy", choices=["toy", "sd15", "sdxl"],
        help="starting values: the base model, teacher and pool settings of `python -m spo_fast.train`'s preset",
    )  # fmt: skip
    p.add_argument("--config", default=None, help="YAML or JSON file with sections model/teacher/data/...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in log.output_dir")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in log.output_dir")
    g = p.add_argument_group("config keys (--section.key value)")
    for key, help_text in field_help().items():
        g.add_argument(
            f"--{key}", dest=f"ov:{key}", default=None, metavar="V", help=help_text.replace("%", "%%")
        )  # argparse formats help with %
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown argument(s) {' '.join(unknown)}; valid config keys: {', '.join(_valid_keys())}")
    ctx = None
    try:
        overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("ov:") and v is not None}
        cfg = make_head_config(args.config, overrides, preset=args.preset)
        if args.print_config:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        from .distributed import init_distributed

        ctx = init_distributed(cfg.train.device)
        if ctx.rank != 0:  # one copy of the progress messages; warnings and errors still come from every rank
            logging.getLogger().setLevel(logging.WARNING)
        clean = False
        try:
            report = HeadDistiller(cfg, resume=args.resume, overwrite=args.overwrite, dist=ctx).run()
            clean = True
        except (ValueError, FileNotFoundError):
            # A clear error: the ranks still meet once before the group ends (see DistributedContext.close). A
            # rank that failed while recording meets the others' post-recording barrier; rank 0 then names the
            # missing shards.
            clean = True
            raise
        finally:
            ctx.close(barrier=clean)  # a no-op once the recording closed the group
    except (ValueError, FileNotFoundError) as e:  # bad settings or a missing input file: one line, no traceback
        where = f"rank {ctx.rank}/{ctx.world_size}: " if ctx is not None and ctx.enabled else ""
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    if report is None:  # a torchrun process other than rank 0: its shards are recorded
        return 0
    ov = report["heldout"]["overall"]
    print(json.dumps({k: report[k] for k in ("head", "encoder", "train_pools", "eval_pools", "steps")} | {
        "heldout_agree_valid": ov["agree_valid"], "standard_error": ov["agree_valid_se"], "per_bucket": {
            b: v["agree_valid"] for b, v in report["heldout"]["buckets"].items()}}, indent=2))  # fmt: skip
    print(f"\nhead written to {report['head']}; report.json and report.png in {cfg.log.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
