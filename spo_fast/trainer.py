"""The SPO training loop: sample pools -> pairs -> shuffle -> train with one policy and one reference forward per
pair -> log -> checkpoint. Configured by :class:`spo_fast.config.SPOConfig`; the CLI is ``spo_fast.train``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .attention import configure_attention
from .config import SPOConfig, config_hash, config_to_dict
from .cuda_graphs import cuda_graphs_requested, maybe_graph
from .distributed import DistributedContext, digest, load_deepspeed_config, require_deepspeed
from .ledger import PairLedger
from .loss import CFGPrediction, spo_log_ratio, spo_loss_from_log_ratios, spo_loss_per_pair
from .pipeline import (
    CFGDenoiser,
    DiffusionComponents,
    PromptEncoder,
    adapters_disabled,
    add_lora,
    load_components,
    save_lora,
)
from .precision import autocast as precision_autocast
from .precision import enable_tf32, resolve_dtype
from .sampler import PoolPairs, PoolSampler, PoolSamplerConfig, ddim_sample

logger = logging.getLogger(__name__)

__all__ = ["SPOTrainer", "NonFiniteLossError", "validate_config", "DecodeScorer", "atomic_save"]

CHECKPOINT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stream_seed(*keys: int) -> int:
    """A 63-bit seed for an independent torch.Generator keyed by integers (seed, iteration, pass, rank, ...)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h ^= (int(k) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        h ^= h >> 31
    return h & (2**63 - 1)


def validate_config(cfg: SPOConfig) -> None:
    """Every check that needs no model: one clear error before anything heavy is loaded."""
    s, t = cfg.sampling, cfg.train
    if t.method not in ("spo", "dpo"):
        raise ValueError(f"train.method must be 'spo' or 'dpo', got {t.method!r}")
    PoolSamplerConfig(
        s.num_steps, s.num_candidates, s.divert_step, s.inner_steps, s.threshold, s.eta, s.lookahead_steps
    ).validate()
    for key, v, lo in (
        ("sampling.batch_size", s.batch_size, 1),
        ("sampling.passes_per_iteration", s.passes_per_iteration, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.inner_epochs", t.inner_epochs, 1),
        ("train.iterations", t.iterations, 1),
        ("train.reference_batches", t.reference_batches, 1),
    ):
        if v < lo:
            raise ValueError(f"{key} must be >= {lo}, got {v}")
    if t.lr < 0 or t.max_grad_norm < 0 or t.warmup_steps < 0:
        raise ValueError("train.lr, train.max_grad_norm and train.warmup_steps must be >= 0")
    if t.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"train.mixed_precision must be 'no' or 'bf16', got {t.mixed_precision!r}")
    if cfg.model.kind not in ("auto", "sd15", "sdxl"):
        raise ValueError(f"model.kind must be auto, sd15 or sdxl, got {cfg.model.kind!r}")
    if cfg.model.dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"model.dtype must be fp32, bf16 or fp16, got {cfg.model.dtype!r}")
    if cfg.preference.kind not in ("toy", "step_aware"):
        raise ValueError(f"preference.kind must be 'toy' or 'step_aware', got {cfg.preference.kind!r}")
    if cfg.model.compile:
        backends = torch.compiler.list_backends(exclude_tags=())
        if cfg.model.compile_backend not in backends:
            raise ValueError(
                f"model.compile_backend {cfg.model.compile_backend!r} is not a torch.compile backend: use inductor "
                f"(default) or one of {', '.join(backends)}"
            )
    head_cmd = f"python -m spo_fast.train_head --preset {cfg.preset} --model.pretrained {cfg.model.pretrained}"
    if cfg.preference.head and not Path(cfg.preference.head).is_file():
        raise ValueError(
            f"preference.head {cfg.preference.head!r} does not exist: train one with `{head_cmd}` (see README) or drop "
            "the option"
        )
    if cfg.preference.verify_head and not cfg.preference.head:
        raise ValueError(
            "preference.verify_head needs preference.head (the head that proposes the pairs): pass --preference.head "
            f"<head.pt>, trained with `{head_cmd}`"
        )
    pr = cfg.preference
    if pr.head_max_timestep < 0:
        raise ValueError(
            f"preference.head_max_timestep must be >= 0 (0: the head scores only the final x_0; 1000: every step), got "
            f"{pr.head_max_timestep}"
        )
    if pr.head_max_timestep < 1000 and not pr.head:
        raise ValueError(
            "preference.head_max_timestep splits the scored steps between a noisy-latent head and this preference "
            f"model and needs preference.head: pass --preference.head <head.pt>, trained with `{head_cmd}`, or drop "
            "--preference.head_max_timestep"
        )
    if pr.head_refresh < 0 or pr.head_refresh_steps < 0 or pr.head_refresh_buffer < 1 or pr.head_refresh_lr <= 0:
        raise ValueError(
            "preference.head_refresh and head_refresh_steps must be >= 0, head_refresh_buffer >= 1 and "
            f"head_refresh_lr > 0 (got {pr.head_refresh}, {pr.head_refresh_steps}, {pr.head_refresh_buffer}, "
            f"{pr.head_refresh_lr})"
        )
    if pr.head_refresh and pr.head_refresh_steps == 0 and not (pr.head_refresh_teacher_labels or pr.head_refresh_carry):
        raise ValueError(
            "preference.head_refresh_steps 0 keeps the head as trained, and without head_refresh_teacher_labels or "
            "head_refresh_carry the teacher's gradients would label nothing: enable one of them or set "
            "head_refresh_steps >= 1"
        )
    if pr.head_audit_every < 0:
        raise ValueError(f"preference.head_audit_every must be >= 0 (0: off), got {pr.head_audit_every}")
    if pr.head_audit_every and not pr.head:
        raise ValueError(
            "preference.head_audit_every checks a noisy-latent head's labels against this preference model and needs "
            f"preference.head: pass --preference.head <head.pt>, trained with `{head_cmd}`, or drop "
            "--preference.head_audit_every"
        )
    if pr.head_refresh and not pr.head:
        raise ValueError(
            "preference.head_refresh fine-tunes a noisy-latent head during SPO and needs preference.head: pass "
            f"--preference.head <head.pt>, trained with `{head_cmd}`, or drop --preference.head_refresh"
        )
    if cfg.preference.kind == "step_aware" and not cfg.preference.checkpoint:
        raise ValueError(
            "preference.kind=step_aware needs preference.checkpoint: the official step-aware preference model "
            "(see README 'Train SD1.5 / SDXL' for where to get it)"
        )


@dataclass
class DecodeScorer:
    """Scores predicted x0 latents: VAE decode, then ``image_scorer(images[-1,1], timesteps, prompts)``."""

    components: DiffusionComponents
    image_scorer: Any
    prompts: Sequence[str] = ()
    decode_batch: int = 64

    @torch.no_grad()
    def __call__(self, x0: Tensor, timesteps: Tensor, prompt_index: Tensor) -> Tensor:
        out = []
        for s in range(0, x0.shape[0], self.decode_batch):
            sl = slice(s, s + self.decode_batch)
            images = self.components.decode(x0[sl]).float()
            idx = prompt_index[sl].tolist()
            out.append(self.image_scorer(images, timesteps[sl], [self.prompts[i] for i in idx]).float())
        return torch.cat(out)


def _load_prompts(spec: str, column: str, split: str) -> list[str]:
    if spec == "toy":
        from .toy import prompt_splits

        train, heldout = prompt_splits()
        return list(train if split == "train" else heldout)
    from .data import load_prompts

    return load_prompts(spec, column=column or None)


def _spread(prompts: list[str], n: int) -> list[str]:
    """n prompts evenly spaced over the list (prompt files are often sorted: the first n are not representative)."""
    if n >= len(prompts):
        return list(prompts)
    step = len(prompts) / n
    return [prompts[int(i * step)] for i in range(n)]


class SPOTrainer:
    """Owns the models, the sampler, the ledger and the optimizer for one run.

    Distributed (``dist`` from :func:`spo_fast.distributed.init_distributed`, or an already initialised process
    group): every rank builds the same trainer, samples its own prompts, and :meth:`run` gathers all ranks' pairs,
    trains each rank on its shard of the shared order with DDP (or DeepSpeed with ``deepspeed_config``), and writes
    logs, samples and checkpoints from rank 0 only. Methods that communicate must be called on every rank.
    """

    def __init__(
        self,
        cfg: SPOConfig,
        resume: bool = False,
        overwrite: bool = False,
        image_scorer: Any | None = None,
        dist: DistributedContext | None = None,
        deepspeed_config: str | os.PathLike | dict[str, Any] | None = None,
    ) -> None:
        """``image_scorer(images[-1, 1], timesteps, prompts) -> scores`` replaces the configured preference model
        (any step-aware reward: the sampler scores decoded predicted x0 at their timestep). ``deepspeed_config`` is a
        DeepSpeed JSON config (path or dict); see :func:`spo_fast.distributed.load_deepspeed_config`."""
        validate_config(cfg)
        self.cfg = cfg
        self._custom_scorer = image_scorer
        self.out = Path(cfg.log.output_dir)
        if dist is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            dist = DistributedContext.from_process_group(cfg.train.device) if initialised else DistributedContext()
        self.dist = dist
        self.rank, self.world_size = dist.rank, dist.world_size
        self._collective_step(self._load_inputs, deepspeed_config)
        # A rank with another config, prompt list or DeepSpeed config would sample, shard or step differently and
        # deadlock (or silently diverge) later: compare digests now and fail on every rank, naming the odd ones out.
        self.dist.check_same("config (config_hash)", config_hash(cfg, ignore=("log.progress",)), "launch every rank "
                             "with the same --preset/--config/overrides")  # fmt: skip
        self.dist.check_same("training prompt list", digest(self.train_prompts))
        self.dist.check_same("DeepSpeed config", digest(self.ds_config))
        self._collective_step(self._check_output, resume, overwrite)
        self._prepare_output(overwrite)
        if self.dist.enabled:
            self.device = self.dist.device
        else:
            dev = cfg.train.device
            self.device = torch.device(
                "cuda" if dev == "auto" and torch.cuda.is_available() else dev if dev != "auto" else "cpu"
            )
        self._collective_step(self._build_models)
        self._setup_parallel()
        self.iteration = 0
        self.opt_step = 0
        self.unet_rows = {"sampling": 0, "training": 0}
        self.ledger = PairLedger(seed=cfg.train.seed)
        if resume:
            self._load_checkpoint()

    def _collective_step(self, fn: Any, *args: Any) -> None:
        """Run a setup step that may fail on one rank only (a missing file on one node): every rank raises then,
        instead of the others waiting in the next collective until the timeout."""
        if not self.dist.enabled:
            fn(*args)
            return
        error = None
        try:
            fn(*args)
        except (ValueError, OSError) as e:  # a DistributedError raised on every rank is agreed on like any other
            error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        self.dist.agree(error)

    def _load_inputs(self, deepspeed_config: str | os.PathLike | dict[str, Any] | None) -> None:
        cfg = self.cfg
        self.train_prompts = _load_prompts(cfg.data.prompts, cfg.data.column, "train")
        if not self.train_prompts:
            raise ValueError(f"the prompt list {cfg.data.prompts!r} is empty")
        self.eval_prompts = (
            _spread(_load_prompts(cfg.data.eval_prompts, cfg.data.column, "heldout"), cfg.data.num_eval_prompts)
            if cfg.data.eval_prompts
            else []
        )
        self.ds_config = None
        if deepspeed_config is not None:
            if cfg.model.compile:
                raise ValueError(
                    "model.compile is not supported with DeepSpeed (its engine owns the module): drop --model.compile, "
                    "or train with DDP (torchrun without --deepspeed)"
                )
            t = cfg.train
            self.ds_config = load_deepspeed_config(
                deepspeed_config, t.batch_size, t.grad_accum, self.world_size, t.max_grad_norm, cfg.model.lora_rank > 0
            )

    # ----------------------------------------------------------------------------------------------- setup
    def _prepare_output(self, overwrite: bool) -> None:
        # Every rank has checked the old run folder before rank 0 changes it (_check_output ends in a collective).
        if self.rank == 0:
            if overwrite and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            d = config_to_dict(self.cfg)
            d["_hash"] = config_hash(self.cfg)
            _atomic_write_text(self.out / "config.json", json.dumps(d, indent=2))
        self.dist.barrier()

    def _check_output(self, resume: bool, overwrite: bool) -> None:
        cfg_path = self.out / "config.json"
        if cfg_path.is_file() and not overwrite:
            old = json.loads(cfg_path.read_text())
            new = config_to_dict(self.cfg)
            if config_hash(self.cfg) != old.get("_hash"):
                diff = [
                    f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}"
                    for s, sec in new.items()
                    if isinstance(sec, dict)
                    for k, v in sec.items()
                    if old.get(s, {}).get(k) != v and k not in ("iterations", "progress")
                ]
                raise ValueError(
                    f"{self.out} holds a run with a different config ({'; '.join(diff) or 'see config.json'}): "
                    "choose another --log.output_dir, or pass --overwrite to discard it"
                )
            if not resume:
                raise ValueError(f"{self.out} already holds this run: pass --resume to continue it or --overwrite")
        elif resume and not cfg_path.is_file():
            raise ValueError(f"--resume given but {self.out} holds no run (no config.json)")

    def _build_models(self) -> None:
        cfg = self.cfg
        pretrained = cfg.model.pretrained
        if pretrained == "toy":
            from .toy import toy_model_path

            pretrained = str(toy_model_path())
        kind = None if cfg.model.kind == "auto" else cfg.model.kind
        if self.device.type == "cuda":
            enable_tf32()
        self.components = load_components(
            pretrained,
            kind,
            resolve_dtype(cfg.model.dtype, self.device),
            cfg.model.vae or None,
            cfg.model.resolution or None,
            self.device,
        )
        unet = self.components.unet
        self.attention_backend = configure_attention(unet, cfg.model.attention)
        if cfg.model.lora_rank > 0:
            # peft draws the LoRA A matrices from the global RNG: seed it from train.seed (without disturbing the
            # caller's RNG) so that two runs of one config start from the same adapter, which a resumed run and a
            # multi-rank run (rank 0's adapter is broadcast) are compared against.
            forked = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=forked, device_type=self.device.type if forked else "cuda"):
                torch.manual_seed(_stream_seed(cfg.train.seed, 3))
                self.params = add_lora(unet, cfg.model.lora_rank, cfg.model.lora_alpha or None, cfg.model.lora_targets)
            self.ref_unet = None
        else:
            import copy

            self.ref_unet = copy.deepcopy(unet).requires_grad_(False)
            unet.requires_grad_(True)
            unet.to(torch.float32)
            self.params = list(unet.parameters())
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.encoder = PromptEncoder(self.components, device=self.device)
        uncond = self.encoder([""])
        g = cfg.sampling.guidance_scale
        ref_unet = self.ref_unet if self.ref_unet is not None else unet
        self._compiled: dict[int, Any] = {}
        sample_unet = unet
        if cfg.model.compile:
            ref_unet = self._compile(ref_unet)
            # CUDA graphs already replay the sampling forwards without launch overhead; a compiled module inside a
            # capture is not something this code relies on, so graphed sampling stays eager.
            if not cuda_graphs_requested(None, self.device):
                sample_unet = self._compile(unet)
                # The VAE decoder too (in place: its state dict keeps its keys): at small sizes the teacher's decodes
                # of every candidate are per-module overhead (tiny models, one CPU thread: the fast path's decode
                # phase 1.46x; bench_e2e_small_decoder_compile.json).
                self.components.vae.decoder.compile(backend=cfg.model.compile_backend)
        self.policy = CFGDenoiser(sample_unet, uncond, g)
        self.reference = CFGDenoiser(ref_unet, uncond, g)
        self.image_scorer = self._build_preference()
        # The fused AdamW (one kernel over all parameters) where it exists: LoRA is many small tensors, so the
        # per-tensor loop costs ~3.7x more per step on a CPU (bench: 1.93 vs 0.53 ms at small scale). DeepSpeed
        # wraps the optimizer itself and keeps the plain one.
        fused = self.ds_config is None and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in self.params
        )
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.train.lr,
            betas=tuple(cfg.train.adam_betas),
            weight_decay=cfg.train.weight_decay,
            eps=cfg.train.adam_eps,
            fused=fused or None,
        )
        warm = cfg.train.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        s = cfg.sampling
        if cfg.train.method == "dpo":
            # Trajectory level: k full chains per prompt from x_T, labelled by the final image only.
            sc = PoolSamplerConfig(s.num_steps, 2, 0, s.num_steps - 1, s.threshold, s.eta)
        else:
            sc = PoolSamplerConfig(
                s.num_steps, s.num_candidates, s.divert_step, s.inner_steps, s.threshold, s.eta, s.lookahead_steps
            )
        self.scorer = DecodeScorer(self.components, self.image_scorer)
        # CUDA graphs for the sampling forwards (no grad, static shapes per phase); a pass-through on CPU.
        self._sample_denoiser = maybe_graph(self._policy_no_grad, self.device)
        head = None
        self.head_refresher = None
        if cfg.preference.head and cfg.train.method == "spo":  # DPO labels whole trajectories: keep the teacher
            from .head import HeadScorer, RefreshingHeadScorer, load_head

            module = load_head(cfg.preference.head, self.components, self.device, pretrained=cfg.model.pretrained)
            distilled = getattr(module, "distillation", None) or {}
            n = cfg.sampling.lookahead_steps
            if distilled.get("lookahead_steps", n) != n:
                # A warning, not an error: a mismatched head still runs, but it ranks candidates by another x0
                # estimate than this run's teacher (on the toy world SPO on 1-step x0 labels falls, 4.10 -> 2.45,
                # where 2-jump labels rise: README, lookahead scoring).
                logger.warning(
                    "head %s was distilled from a teacher judging the x0 after %d lookahead jump(s); this run's "
                    "teacher judges %d (sampling.lookahead_steps): retrain the head with --sampling.lookahead_steps "
                    "%d (train_head's --preset %s matches this run's preset)",
                    cfg.preference.head, distilled["lookahead_steps"], n, n, cfg.preset,
                )  # fmt: skip
            p = cfg.preference
            if p.head_refresh:
                head = self.head_refresher = RefreshingHeadScorer(
                    module, self.components, self.image_scorer, self._policy_grad, lambda ps: self.encoder(ps).embeds,
                    every=p.head_refresh, steps=p.head_refresh_steps, lr=p.head_refresh_lr,
                    buffer=p.head_refresh_buffer, seed=_stream_seed(cfg.train.seed, self.rank, 5),
                    teacher_labels=p.head_refresh_teacher_labels, carry=p.head_refresh_carry,
                    through_unet=p.head_refresh_through_unet,
                )  # fmt: skip
            else:
                head = HeadScorer(module)
        self.sampler = PoolSampler(
            self._sample_denoiser, self.components.scheduler, self.scorer, sc, head=head,
            verify_head=head is not None and cfg.preference.verify_head,
            head_max_timestep=cfg.preference.head_max_timestep if head is not None else None,
        )  # fmt: skip
        if self.head_refresher is not None:
            self.head_refresher.sampler, self.head_refresher.prompts = self.sampler, self.scorer
            self.head_refresher.dist = self.dist

    def _setup_parallel(self) -> None:
        """Wrap the UNet for the policy's training forward: DeepSpeed engine, DDP, or nothing (one process).

        Sampling, evaluation and the reference forward keep calling the unwrapped UNet (``self.policy`` and
        ``self.reference``): they run without gradients and must not enter DDP's reducer."""
        unet = self.components.unet
        self.engine: Any = None
        self.zero_stage = 0
        if self.ds_config is not None:
            deepspeed = require_deepspeed()
            if not torch.distributed.is_initialized():
                raise ValueError(
                    "--deepspeed needs a process group: launch with torchrun or deepspeed (or use "
                    "spo_fast.distributed.init_distributed(force_group=True))"
                )
            # Our AdamW and LambdaLR go in as client objects: DeepSpeed steps both, and the scheduler keeps
            # editing the lr of the param groups that DeepSpeed's ZeRO optimizer shares with the AdamW.
            self.engine, _, _, _ = deepspeed.initialize(
                model=unet,
                model_parameters=self.params,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                config=self.ds_config,
                dist_init_required=False,
            )
            self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0) or 0)
            train_unet: Any = self.engine
        else:
            train_unet = self.dist.wrap_ddp(unet)
        self.train_unet = train_unet
        g = self.policy.guidance_scale
        if self.cfg.model.compile:
            # DDP under torch.compile: dynamo splits the graph at the gradient buckets (DDPOptimizer), so the
            # all-reduce still overlaps the backward.
            train_unet = self._compile(train_unet)
        self.train_policy = CFGDenoiser(train_unet, self.policy.uncond, g)

    def _compile(self, module: Any) -> Any:
        """One ``torch.compile`` wrapper per module (it shares the module's parameters and adapters)."""
        key = id(module)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(module, backend=self.cfg.model.compile_backend)
        return self._compiled[key]

    def _all_ranks_forward(self) -> bool:
        """ZeRO-3 partitions the weights: every forward (evaluation too) needs all ranks to gather them."""
        return self.zero_stage == 3

    def _gathered_params(self) -> Any:
        if not self._all_ranks_forward():
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.components.unet.parameters()), modifier_rank=None)

    def _build_preference(self) -> Any:
        if self._custom_scorer is not None:
            return self._custom_scorer
        p = self.cfg.preference
        if p.kind == "toy":
            from .toy import ToyImageScorer

            return ToyImageScorer()
        from .preference import StepAwarePreferenceModel

        model = StepAwarePreferenceModel.from_pretrained(
            backbone=p.backbone, checkpoint=p.checkpoint, processor=p.processor or None
        )
        return model.to(self.device).eval()

    def _autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return precision_autocast(self.device, self._bf16)
        return nullcontext()

    @property
    def _bf16(self) -> torch.dtype:
        # bf16 on a device without it falls back to fp32 with one log line (resolve_dtype logs it).
        if not hasattr(self, "_bf16_dtype"):
            self._bf16_dtype = resolve_dtype("bf16", self.device)
        return self._bf16_dtype

    def _policy_no_grad(self, latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        with self._autocast():
            return self.policy(latents, timesteps, cond)

    def _policy_grad(self, latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        """The policy's CFG prediction, differentiable in ``latents`` (the head refresh's teacher gradient)."""
        with self._autocast():
            return self.policy(latents, timesteps, cond).float()

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_pairs(self, iteration: int) -> tuple[PoolPairs, list[str], dict[str, Any]]:
        cfg = self.cfg
        all_pairs, prompts_all, stats = [], [], {"valid": 0, "records": 0, "scores": {}}
        offset = 0
        every = cfg.preference.head_audit_every
        # The label audit (PoolSampler.audit): iterations 1, 1 + N, ... so a short run audits its first one.
        self.sampler.audit = bool(every) and self.sampler.head is not None and iteration % every == 0
        if self.sampler.audit:
            stats["audit"], stats["audit_rows"] = {}, 0
        for p in range(cfg.sampling.passes_per_iteration):
            pass_index = iteration * cfg.sampling.passes_per_iteration + p
            g = torch.Generator().manual_seed(_stream_seed(cfg.train.seed, pass_index, self.rank, 1))
            ids = torch.randint(0, len(self.train_prompts), (cfg.sampling.batch_size,), generator=g)
            prompts = [self.train_prompts[i] for i in ids.tolist()]
            cond = self.encoder(prompts)
            self.scorer.prompts = prompts
            gen = torch.Generator(device=self.device).manual_seed(
                _stream_seed(cfg.train.seed, pass_index, self.rank, 2)
            )
            latents = (
                torch.randn((len(prompts), *self.components.latent_shape), generator=gen, device=self.device)
                * self.components.scheduler.init_noise_sigma
            )
            res = self.sampler.sample(
                cond, latents, gen, self.ledger, pass_index, ids, seed=_stream_seed(cfg.train.seed, self.rank)
            )
            cfg_mult = 2 if cfg.sampling.guidance_scale > 1 else 1
            self.unet_rows["sampling"] += res.unet_rows * cfg_mult
            pairs = res.pairs
            pairs.prompt_index = pairs.prompt_index + offset
            offset += len(prompts)
            prompts_all += prompts
            all_pairs.append(pairs)
            for t, sc, v in zip(res.log.score_timesteps, res.log.scores, res.log.valid):
                stats["scores"].setdefault(t, []).append(sc.mean().item())
                stats["valid"] += int(v.sum())
                stats["records"] += v.numel()
            if self.sampler.audit:
                from .head import audit_counts

                audit_counts(res.log, cfg.sampling.threshold, stats["audit"])
                stats["audit_rows"] += res.log.audit_rows * cfg_mult
        return PoolPairs.cat(all_pairs), prompts_all, stats

    def refresh_head(self) -> dict[str, float]:
        """With ``preference.head_refresh``: fine-tune the head on the teacher gradients recorded while sampling
        (call once per iteration, after sampling); returns its loss / cosine and time. Without it: ``{}``."""
        r = self.head_refresher
        if r is None:
            return {}
        t0 = time.perf_counter()
        out = r.update()
        cfg_mult = 2 if self.cfg.sampling.guidance_scale > 1 else 1
        # Forward-equivalent rows of the teacher-gradient passes: forward + backward ~ 3 forwards (forward only when
        # the gradient stops at the UNet outputs).
        self.unet_rows["head_refresh"] = r.unet_rows * cfg_mult * (3 if r.through_unet else 1)
        return {**out, "time_head_refresh": time.perf_counter() - t0}

    def gather_pairs(
        self, pairs: PoolPairs, prompts: list[str], stats: dict[str, Any] | None = None
    ) -> tuple[PoolPairs, list[str], dict[str, Any] | None]:
        """Every rank's pairs and prompts on every rank, in rank order (collective); ``stats`` summed over ranks.
        One process: returned unchanged."""
        pairs, prompts = self.dist.gather_pairs(pairs, prompts)
        if stats is not None and self.dist.enabled:
            merged: dict[str, Any] = {"valid": 0, "records": 0, "scores": {}}
            for s in self.dist.all_gather_object(stats):
                merged["valid"] += s["valid"]
                merged["records"] += s["records"]
                for t, v in s["scores"].items():
                    merged["scores"].setdefault(t, []).extend(v)
                if "audit" in s:  # label audit counts add over ranks
                    merged["audit_rows"] = merged.get("audit_rows", 0) + s["audit_rows"]
                for name, c in s.get("audit", {}).items():
                    m = merged.setdefault("audit", {}).setdefault(name, dict.fromkeys(c, 0))
                    for key, n in c.items():
                        m[key] += n
            stats = merged
        return pairs, prompts, stats

    # ----------------------------------------------------------------------------------------------- training
    def _predict(self, denoiser: CFGDenoiser, x: Tensor, t: Tensor, cond: Any) -> Tensor | CFGPrediction:
        """The prediction the loss needs. With train-time CFG the policy's halves stay separate (a
        ``CFGPrediction``): the loss combines them itself, in one fused pass on GPUs."""
        with self._autocast():
            if self.cfg.train.train_cfg and denoiser.guidance_scale > 1:
                u, c = denoiser(x, t, cond, return_halves=True)
                return CFGPrediction(u, c, denoiser.guidance_scale)
            return denoiser.unet_forward(x, t, cond)

    def _pair_inputs(self, pairs: PoolPairs, prompts: list[str]) -> tuple[Tensor, Tensor, Any]:
        """The UNet inputs of a batch of pairs: parents ``x``, timesteps and prompt embeddings (win and lose rows
        stacked when they have their own parents)."""
        cond = self.encoder([prompts[i] for i in pairs.prompt_index.tolist()])
        ts = pairs.timesteps.to(self.device)
        if pairs.shared_parent:
            return pairs.parent_win, ts, cond
        # win and lose have their own parents (inner steps / trajectory-level): both in one batch
        return torch.cat([pairs.parent_win, pairs.parent_lose]), torch.cat([ts, ts]), type(cond).cat([cond, cond])

    @torch.no_grad()
    def _reference(self, x: Tensor, ts: Tensor, cond: Any) -> Tensor:
        with self._adapters_disabled():
            ref = self._predict(self.reference, x, ts, cond)
        return ref.combined() if isinstance(ref, CFGPrediction) else ref

    def reference_predictions(self, pairs: PoolPairs, prompts: list[str], index: Tensor) -> Tensor:
        """The frozen reference's predictions for the pairs ``index`` (``[len(index), ...]``, or ``[2 len(index),
        ...]`` win rows then lose rows when the pairs have their own parents), in no-grad forwards of
        ``train.reference_batches * train.batch_size`` pairs."""
        chunk = self.cfg.train.reference_batches * self.cfg.train.batch_size
        wins, loses = [], []
        for i in range(0, len(index), chunk):
            part = pairs.select(index[i : i + chunk]).to(self.device)
            ref = self._reference(*self._pair_inputs(part, prompts))
            wins.append(ref[: len(part)])
            loses.append(ref[len(part) :])
        if pairs.shared_parent:
            return torch.cat(wins)
        return torch.cat(wins + loses)

    def pair_loss(
        self, pairs: PoolPairs, prompts: list[str], ref: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair loss and clipped ratios: one policy forward (grad) and one reference forward per parent.
        ``ref``: the reference's predictions when already computed (:meth:`reference_predictions`)."""
        sched, s, t = self.components.scheduler, self.cfg.sampling, self.cfg.train
        x, ts, cond = self._pair_inputs(pairs, prompts)
        policy = self._predict(self.train_policy, x, ts, cond)
        if ref is None:
            ref = self._reference(x, ts, cond)
        n = len(pairs)
        self.unet_rows["training"] += x.shape[0] * (2 if t.train_cfg and s.guidance_scale > 1 else 1) * 4
        if pairs.shared_parent:
            per_pair, rw, rl, _, _ = spo_loss_per_pair(
                policy, ref, x, pairs.win, pairs.lose, ts, sched, s.eta, t.beta, t.eps
            )
            return per_pair, rw, rl
        from .ddim import ddim_coefficients

        c = ddim_coefficients(sched, ts[:n], s.eta, batch_size=n, device=x.device)
        pol = policy.combined() if isinstance(policy, CFGPrediction) else policy
        lr_w = spo_log_ratio(c, pol[:n], ref[:n], pairs.parent_win, pairs.win)
        lr_l = spo_log_ratio(c, pol[n:], ref[n:], pairs.parent_lose, pairs.lose)
        return spo_loss_from_log_ratios(lr_w, lr_l, t.beta, t.eps)

    def _adapters_disabled(self):
        if self.ref_unet is not None:
            return nullcontext()
        return adapters_disabled(self.components.unet)

    def train_on(self, pairs: PoolPairs, prompts: list[str], iteration: int) -> dict[str, float]:
        t = self.cfg.train
        n = len(pairs)
        logs: dict[str, list[float]] = {"loss": [], "ratio_win": [], "ratio_lose": [], "grad_norm": []}
        if n == 0:
            return {}
        plan = []
        for epoch in range(t.inner_epochs):
            order = self.ledger.epoch_order(iteration * t.inner_epochs + epoch, n)
            order = self.ledger.shard(order, self.rank, self.world_size)
            plan.append([order[i : i + t.batch_size] for i in range(0, len(order), t.batch_size)])
        refs = None
        if t.reference_batches > 1:
            # The reference is frozen: its predictions for every pair this rank trains on come from a few large
            # no-grad forwards before the first optimizer step (per-call overhead paid once per chunk, not per
            # micro-batch). Every rank holds equally many pairs, so all run equally many forwards (ZeRO-3 gathers).
            index = torch.unique(torch.cat([idx for batches in plan for idx in batches]))
            ref_rows = self.reference_predictions(pairs, prompts, index)
            slot = torch.full((n,), -1, dtype=torch.long)
            slot[index] = torch.arange(len(index))
            refs = (slot, ref_rows, len(index))
        self.components.unet.train()
        for batches in plan:
            for bi, idx in enumerate(batches):
                # Every rank holds the same number of micro-batches (equal shards), so all reach the sync together.
                sync = (bi + 1) % t.grad_accum == 0 or bi == len(batches) - 1
                mb = pairs.select(idx).to(self.device)
                # DeepSpeed accumulates on its own (set_gradient_accumulation_boundary below); DDP needs no_sync.
                with self.dist.maybe_no_sync(self.train_unet if self.engine is None else None, sync):
                    ref = None
                    if refs is not None:
                        slot, rows, m = refs
                        at = slot[idx].to(rows.device)
                        ref = rows[at] if pairs.shared_parent else torch.cat([rows[at], rows[at + m]])
                    per_pair, rw, rl = self.pair_loss(mb, prompts, ref=ref)
                    loss = per_pair.mean()
                    finite = bool(torch.isfinite(loss))
                    # Collective, so that every rank stops (one rank raising alone would leave the others waiting
                    # in the gradient all-reduce).
                    if not self.dist.all_true(finite):
                        where = f"loss {loss.item()}" if not finite else "a non-finite loss on another rank"
                        raise NonFiniteLossError(
                            f"non-finite loss ({where}) at iteration {iteration}; the last good checkpoint in "
                            f"{self.out / 'checkpoints'} is kept (try a lower train.lr or train.mixed_precision=no)"
                        )
                    if self.engine is not None:
                        self.engine.set_gradient_accumulation_boundary(sync)
                        self.engine.backward(loss)  # divides by gradient_accumulation_steps (= train.grad_accum)
                    else:
                        (loss / t.grad_accum).backward()
                logs["loss"].append(loss.item())
                logs["ratio_win"].append(rw.mean().item())
                logs["ratio_lose"].append(rl.mean().item())
                if sync:
                    logs["grad_norm"].append(self._optimizer_step())
        self.components.unet.eval()
        # Shards are equal, so the mean over ranks of per-rank means is the mean over the union (grad_norm is global
        # already: gradients are all-reduced before the norm).
        out = self.dist.mean_over_ranks({k: sum(v) / len(v) for k, v in logs.items() if v})
        # This rank's micro-batch losses in order: the stored toy curve (tests/data) guards against numerical drift.
        out["micro_losses"] = [round(x, 7) for x in logs["loss"]]
        return out

    def _optimizer_step(self) -> float:
        t = self.cfg.train
        if self.engine is not None:  # clips (gradient_clipping = train.max_grad_norm), steps AdamW and the scheduler
            self.engine.step()
            self.opt_step += 1
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        # A list, not a filter(...) iterator: the official trainer's exhausted iterator made clipping a no-op.
        grads = [p for p in self.params if p.grad is not None]
        if t.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, t.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.opt_step += 1
        return float(norm)

    # ----------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, return_images: bool = False) -> dict[str, Any]:
        """Held-out preference score of the current policy: fixed noise, 20-step DDIM (eta = 0), CFG."""
        prompts = list(prompts if prompts is not None else self.eval_prompts)
        if not prompts:
            return {}
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(_stream_seed(cfg.train.seed, 777))
        latents = torch.randn((len(prompts), *self.components.latent_shape), generator=gen, device=self.device)
        cond = self.encoder(prompts)
        x0 = ddim_sample(self._sample_denoiser, self.components.scheduler, latents, cond, cfg.sampling.num_steps, 0.0)
        images = torch.cat([self.components.decode(x0[i : i + 64]).float() for i in range(0, len(prompts), 64)])
        scores = self.image_scorer(images, torch.zeros(len(prompts), dtype=torch.long, device=images.device), prompts)
        out: dict[str, Any] = {"eval_score": scores.float().mean().item()}
        if return_images:
            out["images"] = images.cpu()
        return out

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/iter_N.pt`` (or ``checkpoints/deepspeed/iter_N/`` with DeepSpeed) and point
        ``checkpoints/latest`` at it. Collective: every rank calls it; rank 0 writes (with DeepSpeed every rank
        writes its own ZeRO shards). ``latest`` moves only after everything is written, so a crash mid-save resumes
        from the previous checkpoint."""
        ledgers = self.dist.all_gather_object(self.ledger.state_dict())
        meta = {
            "version": CHECKPOINT_VERSION,
            "iteration": self.iteration,
            "opt_step": self.opt_step,
            "ledger": ledgers[0],
            "ledger_ranks": ledgers,  # each rank's sampling statistics, restored per rank
            "world_size": self.world_size,
            "unet_rows": dict(self.unet_rows),
            "config_hash": config_hash(self.cfg),
        }
        if self.head_refresher is not None:
            # The refreshed head and its buffer are rank-local state too (weights equal across ranks; buffers not).
            meta["head_refresh_ranks"] = self.dist.all_gather_object(self.head_refresher.state_dict())
        name = f"iter_{self.iteration:06d}"
        ckpt = self._ckpt_dir()
        if self.engine is not None:
            path = ckpt / "deepspeed" / name
            self.engine.save_checkpoint(str(path.parent), tag=name, client_state=meta, save_latest=False)
            self.dist.barrier()  # every rank's shards are on disk before `latest` points at them
        else:
            path = ckpt / f"{name}.pt"
            if self.rank == 0:
                trainable = {n: p.detach().cpu() for n, p in self.components.unet.named_parameters() if p.requires_grad}
                state = {
                    **meta,
                    "trainable": trainable,
                    "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict(),
                }
                atomic_save(state, path)
        if self.rank == 0:
            _atomic_write_text(ckpt / "latest", str(path.relative_to(ckpt)))
            keep = self.cfg.log.keep_checkpoints
            for old in sorted(ckpt.glob("iter_*.pt"))[:-keep]:
                old.unlink()
            for old in sorted((ckpt / "deepspeed").glob("iter_*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path

    def _load_checkpoint(self) -> None:
        latest = self._ckpt_dir() / "latest"
        name = latest.read_text().strip() if latest.is_file() else ""
        self.dist.check_same(
            "latest checkpoint", name or "<none>", "every rank must see the same log.output_dir (a shared filesystem "
            "on multi-node runs)"
        )  # fmt: skip
        if not name:
            logger.info("no checkpoint in %s: starting from iteration 0", self._ckpt_dir())
            return
        is_ds = name.startswith("deepspeed/")
        if is_ds != (self.engine is not None):
            saved, now = ("DeepSpeed", "without --deepspeed") if is_ds else ("DDP / one process", "with --deepspeed")
            raise ValueError(f"the checkpoint {name} was written by a {saved} run; it cannot be resumed {now}")
        if is_ds:
            path, state = self.engine.load_checkpoint(
                str(self._ckpt_dir() / "deepspeed"), tag=Path(name).name, load_lr_scheduler_states=True
            )
            if path is None:
                raise ValueError(f"DeepSpeed could not load the checkpoint {self._ckpt_dir() / name}")
            if state.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"checkpoint version {state.get('version')} != supported {CHECKPOINT_VERSION}")
        else:
            state = torch.load(self._ckpt_dir() / name, map_location="cpu", weights_only=False)
            if state.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"checkpoint version {state.get('version')} != supported {CHECKPOINT_VERSION}")
            named = dict(self.components.unet.named_parameters())
            missing = set(state["trainable"]) - set(named)
            if missing:
                raise ValueError(f"checkpoint holds parameters this model lacks: {sorted(missing)[:5]}")
            with torch.no_grad():
                for n, v in state["trainable"].items():
                    named[n].copy_(v)
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        ledgers = state.get("ledger_ranks")
        if ledgers is not None and len(ledgers) == self.world_size:
            self.ledger.load_state_dict(ledgers[self.rank])
        else:
            if ledgers is not None:
                logger.warning(
                    "the checkpoint was written by %d ranks, this run has %d: every rank restores rank 0's sampling "
                    "statistics (training state is unaffected)", len(ledgers), self.world_size
                )  # fmt: skip
            self.ledger.load_state_dict(state["ledger"])
        if self.head_refresher is not None:
            heads = state.get("head_refresh_ranks")
            if not heads:
                raise ValueError(
                    f"the checkpoint {name} was written without preference.head_refresh: resume with the same "
                    "preference settings"
                )
            self.head_refresher.load_state_dict(heads[self.rank] if len(heads) == self.world_size else heads[0])
        self.iteration = state["iteration"]
        self.opt_step = state["opt_step"]
        self.unet_rows = dict(state["unet_rows"])
        if self.rank == 0:
            self._truncate_metrics(self.iteration)
        self.dist.barrier()
        logger.info("resumed from %s at iteration %d", name, self.iteration)

    def _truncate_metrics(self, iteration: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [
                ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("iteration", 0) <= iteration
            ]
            _atomic_write_text(path, "".join(x + "\n" for x in keep))

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train for ``train.iterations`` iterations (continuing from a resumed one); returns the summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        # Evaluation runs on rank 0 alone (the others go on sampling and wait at the next gather), except under
        # ZeRO-3, where every forward needs every rank.
        eval_here = self.rank == 0 or self._all_ranks_forward()
        if self.iteration == 0 and self.eval_prompts and eval_here:
            with self._gathered_params():
                before = self.evaluate(return_images=True)
            if self.rank == 0:
                self._log({"iteration": 0, "eval_score": before["eval_score"], "unet_rows": dict(self.unet_rows)})
                self._save_grid(before["images"], "samples_before.png")
        bar = tqdm(
            range(self.iteration, cfg.train.iterations),
            initial=self.iteration,
            total=cfg.train.iterations,
            desc=f"SPO[{cfg.train.method}]",
            disable=not cfg.log.progress or self.rank != 0,
        )
        t_start = time.perf_counter()
        for it in bar:
            t0 = time.perf_counter()
            pairs, prompts, stats = self.sample_pairs(it)
            pairs, prompts, stats = self.gather_pairs(pairs, prompts, stats)
            t1 = time.perf_counter()
            train_logs = self.train_on(pairs, prompts, it)
            train_logs.update(self.refresh_head())
            self.iteration = it + 1
            rec: dict[str, Any] = {
                "iteration": self.iteration,
                "pairs": len(pairs),
                "valid_rate": stats["valid"] / max(1, stats["records"]),
                "score_per_timestep": {str(k): sum(v) / len(v) for k, v in stats["scores"].items()},
                "lr": self.lr_scheduler.get_last_lr()[0],
                "time_sampling": t1 - t0,
                "time_training": time.perf_counter() - t1,
                "unet_rows": dict(self.unet_rows),
                **train_logs,
            }
            if "audit" in stats:
                from .head import audit_summary

                rec["head_audit"] = {**audit_summary(stats["audit"]), "unet_rows": stats["audit_rows"]}
            last = self.iteration == cfg.train.iterations
            eval_now = (cfg.log.eval_every and self.iteration % cfg.log.eval_every == 0) or last
            if self.eval_prompts and eval_now and eval_here:
                with self._gathered_params():
                    rec.update(self.evaluate(return_images=False))
            self._log(rec)
            bar.set_postfix(loss=f"{train_logs.get('loss', float('nan')):.4f}", valid=f"{rec['valid_rate']:.2f}")
            if self.iteration % cfg.log.checkpoint_every == 0 or last:
                self.save_checkpoint()
        summary = {"output_dir": str(self.out), "iterations": self.iteration, "seconds": time.perf_counter() - t_start}
        self.finalize(summary)
        return summary

    def finalize(self, summary: dict[str, Any]) -> None:
        """Final weights, samples, report and summary.json (written by rank 0; call it on every rank)."""
        after = None
        with self._gathered_params():
            if self.rank == 0 and self.cfg.model.lora_rank > 0:
                summary["lora"] = str(save_lora(self.components.unet, self.out / "lora", self.components.kind))
            elif self.rank == 0:
                self.components.unet.save_pretrained(self.out / "unet")
                summary["unet"] = str(self.out / "unet")
            if self.eval_prompts and (self.rank == 0 or self._all_ranks_forward()):
                after = self.evaluate(return_images=True)
        if self.rank == 0:
            if after is not None:
                self._save_grid(after["images"], "samples_after.png")
                summary["eval_score_after"] = after["eval_score"]
            from .report import write_report

            summary["report"] = str(write_report(self.out))
            _atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        self.dist.barrier()

    def _save_grid(self, images: Tensor, name: str) -> None:
        from .toy import save_grid

        n = min(16, images.shape[0])
        save_grid(images[:n], self.eval_prompts[:n], self.out / name)
