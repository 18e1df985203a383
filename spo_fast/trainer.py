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

from .config import SPOConfig, config_hash, config_to_dict
from .ledger import PairLedger
from .loss import spo_log_ratio, spo_loss_from_log_ratios, spo_loss_per_pair
from .pipeline import CFGDenoiser, DiffusionComponents, PromptEncoder, add_lora, load_components, save_lora
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
    PoolSamplerConfig(s.num_steps, s.num_candidates, s.divert_step, s.inner_steps, s.threshold, s.eta).validate()
    for key, v, lo in (
        ("sampling.batch_size", s.batch_size, 1),
        ("sampling.passes_per_iteration", s.passes_per_iteration, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.inner_epochs", t.inner_epochs, 1),
        ("train.iterations", t.iterations, 1),
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


class SPOTrainer:
    """Owns the models, the sampler, the ledger and the optimizer for one run."""

    def __init__(
        self, cfg: SPOConfig, resume: bool = False, overwrite: bool = False, image_scorer: Any | None = None
    ) -> None:
        """``image_scorer(images[-1, 1], timesteps, prompts) -> scores`` replaces the configured preference model
        (any step-aware reward: the sampler scores decoded predicted x0 at their timestep)."""
        validate_config(cfg)
        self.cfg = cfg
        self._custom_scorer = image_scorer
        self.out = Path(cfg.log.output_dir)
        self.rank, self.world_size = 0, 1
        self.train_prompts = _load_prompts(cfg.data.prompts, cfg.data.column, "train")
        if not self.train_prompts:
            raise ValueError(f"the prompt list {cfg.data.prompts!r} is empty")
        self.eval_prompts = (
            _load_prompts(cfg.data.eval_prompts, cfg.data.column, "heldout")[: cfg.data.num_eval_prompts]
            if cfg.data.eval_prompts
            else []
        )
        self._prepare_output(resume, overwrite)
        dev = cfg.train.device
        self.device = torch.device(
            "cuda" if dev == "auto" and torch.cuda.is_available() else dev if dev != "auto" else "cpu"
        )
        self._build_models()
        self.iteration = 0
        self.opt_step = 0
        self.unet_rows = {"sampling": 0, "training": 0}
        self.ledger = PairLedger(seed=cfg.train.seed)
        if resume:
            self._load_checkpoint()

    # ----------------------------------------------------------------------------------------------- setup
    def _prepare_output(self, resume: bool, overwrite: bool) -> None:
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
        if overwrite and self.out.exists() and self.rank == 0:
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        d = config_to_dict(self.cfg)
        d["_hash"] = config_hash(self.cfg)
        _atomic_write_text(cfg_path, json.dumps(d, indent=2))

    def _build_models(self) -> None:
        cfg = self.cfg
        pretrained = cfg.model.pretrained
        if pretrained == "toy":
            from .toy import toy_model_path

            pretrained = str(toy_model_path())
        kind = None if cfg.model.kind == "auto" else cfg.model.kind
        self.components = load_components(
            pretrained, kind, cfg.model.dtype, cfg.model.vae or None, cfg.model.resolution or None, self.device
        )
        unet = self.components.unet
        if cfg.model.lora_rank > 0:
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
        self.policy = CFGDenoiser(unet, uncond, g)
        self.reference = CFGDenoiser(self.ref_unet if self.ref_unet is not None else unet, uncond, g)
        self.image_scorer = self._build_preference()
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.train.lr,
            betas=tuple(cfg.train.adam_betas),
            weight_decay=cfg.train.weight_decay,
            eps=cfg.train.adam_eps,
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
            sc = PoolSamplerConfig(s.num_steps, s.num_candidates, s.divert_step, s.inner_steps, s.threshold, s.eta)
        self.scorer = DecodeScorer(self.components, self.image_scorer)
        self.sampler = PoolSampler(self._policy_no_grad, self.components.scheduler, self.scorer, sc)

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
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _policy_no_grad(self, latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        with self._autocast():
            return self.policy(latents, timesteps, cond)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_pairs(self, iteration: int) -> tuple[PoolPairs, list[str], dict[str, Any]]:
        cfg = self.cfg
        all_pairs, prompts_all, stats = [], [], {"valid": 0, "records": 0, "scores": {}}
        offset = 0
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
        return PoolPairs.cat(all_pairs), prompts_all, stats

    # ----------------------------------------------------------------------------------------------- training
    def _predict(self, denoiser: CFGDenoiser, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        with self._autocast():
            if self.cfg.train.train_cfg:
                return denoiser(x, t, cond)
            return denoiser.unet_forward(x, t, cond)

    def pair_loss(self, pairs: PoolPairs, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair loss and clipped ratios: one policy forward (grad) and one reference forward per parent."""
        cond = self.encoder([prompts[i] for i in pairs.prompt_index.tolist()])
        sched, s, t = self.components.scheduler, self.cfg.sampling, self.cfg.train
        ts = pairs.timesteps.to(self.device)
        if pairs.shared_parent:
            x = pairs.parent_win
        else:  # win and lose have their own parents (inner steps / trajectory-level): both in one batch
            x = torch.cat([pairs.parent_win, pairs.parent_lose])
            cond = type(cond).cat([cond, cond])
            ts = torch.cat([ts, ts])
        policy = self._predict(self.policy, x, ts, cond).float()
        with torch.no_grad(), self._adapters_disabled():
            ref = self._predict(self.reference, x, ts, cond).float()
        n = len(pairs)
        self.unet_rows["training"] += x.shape[0] * (2 if t.train_cfg and s.guidance_scale > 1 else 1) * 4
        if pairs.shared_parent:
            per_pair, rw, rl, _, _ = spo_loss_per_pair(
                policy, ref, x, pairs.win, pairs.lose, ts, sched, s.eta, t.beta, t.eps
            )
            return per_pair, rw, rl
        from .ddim import ddim_coefficients

        c = ddim_coefficients(sched, ts[:n], s.eta, batch_size=n, device=x.device)
        lr_w = spo_log_ratio(c, policy[:n], ref[:n], pairs.parent_win, pairs.win)
        lr_l = spo_log_ratio(c, policy[n:], ref[n:], pairs.parent_lose, pairs.lose)
        return spo_loss_from_log_ratios(lr_w, lr_l, t.beta, t.eps)

    def _adapters_disabled(self):
        unet = self.components.unet
        if self.ref_unet is not None:
            return nullcontext()

        class _Ctx:
            def __enter__(self_inner):
                unet.disable_adapters()

            def __exit__(self_inner, *exc):
                unet.enable_adapters()

        return _Ctx()

    def train_on(self, pairs: PoolPairs, prompts: list[str], iteration: int) -> dict[str, float]:
        t = self.cfg.train
        n = len(pairs)
        logs: dict[str, list[float]] = {"loss": [], "ratio_win": [], "ratio_lose": [], "grad_norm": []}
        if n == 0:
            return {}
        self.components.unet.train()
        for epoch in range(t.inner_epochs):
            order = self.ledger.epoch_order(iteration * t.inner_epochs + epoch, n)
            order = self.ledger.shard(order, self.rank, self.world_size)
            batches = [order[i : i + t.batch_size] for i in range(0, len(order), t.batch_size)]
            for bi, idx in enumerate(batches):
                mb = pairs.select(idx).to(self.device)
                per_pair, rw, rl = self.pair_loss(mb, prompts)
                loss = per_pair.mean()
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss {loss.item()} at iteration {iteration}; the last good checkpoint in "
                        f"{self.out / 'checkpoints'} is kept (try a lower train.lr or train.mixed_precision=no)"
                    )
                (loss / t.grad_accum).backward()
                logs["loss"].append(loss.item())
                logs["ratio_win"].append(rw.mean().item())
                logs["ratio_lose"].append(rl.mean().item())
                if (bi + 1) % t.grad_accum == 0 or bi == len(batches) - 1:
                    logs["grad_norm"].append(self._optimizer_step())
        self.components.unet.eval()
        return {k: sum(v) / len(v) for k, v in logs.items() if v}

    def _optimizer_step(self) -> float:
        t = self.cfg.train
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
        x0 = ddim_sample(self._policy_no_grad, self.components.scheduler, latents, cond, cfg.sampling.num_steps, 0.0)
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
        trainable = {n: p.detach().cpu() for n, p in self.components.unet.named_parameters() if p.requires_grad}
        state = {
            "version": CHECKPOINT_VERSION,
            "iteration": self.iteration,
            "opt_step": self.opt_step,
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ledger": self.ledger.state_dict(),
            "unet_rows": dict(self.unet_rows),
            "config_hash": config_hash(self.cfg),
        }
        path = self._ckpt_dir() / f"iter_{self.iteration:06d}.pt"
        atomic_save(state, path)
        _atomic_write_text(self._ckpt_dir() / "latest", path.name)
        for old in sorted(self._ckpt_dir().glob("iter_*.pt"))[: -self.cfg.log.keep_checkpoints]:
            old.unlink()
        return path

    def _load_checkpoint(self) -> None:
        latest = self._ckpt_dir() / "latest"
        if not latest.is_file():
            logger.info("no checkpoint in %s: starting from iteration 0", self._ckpt_dir())
            return
        state = torch.load(self._ckpt_dir() / latest.read_text().strip(), map_location="cpu", weights_only=False)
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
        self.ledger.load_state_dict(state["ledger"])
        self.iteration = state["iteration"]
        self.opt_step = state["opt_step"]
        self.unet_rows = dict(state["unet_rows"])
        self._truncate_metrics(self.iteration)
        logger.info("resumed from %s at iteration %d", latest.read_text().strip(), self.iteration)

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
        if self.iteration == 0 and self.eval_prompts:
            before = self.evaluate(return_images=True)
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
            t1 = time.perf_counter()
            train_logs = self.train_on(pairs, prompts, it)
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
            last = self.iteration == cfg.train.iterations
            if self.eval_prompts and ((cfg.log.eval_every and self.iteration % cfg.log.eval_every == 0) or last):
                rec.update(self.evaluate(return_images=False))
            self._log(rec)
            bar.set_postfix(loss=f"{train_logs.get('loss', float('nan')):.4f}", valid=f"{rec['valid_rate']:.2f}")
            if self.rank == 0 and (self.iteration % cfg.log.checkpoint_every == 0 or last):
                self.save_checkpoint()
        summary = {"output_dir": str(self.out), "iterations": self.iteration, "seconds": time.perf_counter() - t_start}
        if self.rank == 0:
            self.finalize(summary)
        return summary

    def finalize(self, summary: dict[str, Any]) -> None:
        if self.cfg.model.lora_rank > 0:
            summary["lora"] = str(save_lora(self.components.unet, self.out / "lora", self.components.kind))
        else:
            self.components.unet.save_pretrained(self.out / "unet")
            summary["unet"] = str(self.out / "unet")
        if self.eval_prompts:
            after = self.evaluate(return_images=True)
            self._save_grid(after["images"], "samples_after.png")
            summary["eval_score_after"] = after["eval_score"]
        from .report import write_report

        summary["report"] = str(write_report(self.out))
        _atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))

    def _save_grid(self, images: Tensor, name: str) -> None:
        from .toy import save_grid

        n = min(16, images.shape[0])
        save_grid(images[:n], self.eval_prompts[:n], self.out / name)
