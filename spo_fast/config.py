"""Typed training configuration: dataclasses with a help line per field, named presets, YAML/JSON files and
``--section.key value`` command-line overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

__all__ = [
    "ModelConfig",
    "PreferenceConfig",
    "DataConfig",
    "SamplingConfig",
    "TrainConfig",
    "LogConfig",
    "SPOConfig",
    "PRESETS",
    "make_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "config_hash",
]


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    pretrained: str = _f("toy", "diffusers pipeline folder or hub id; 'toy' = the built-in toy base model")
    kind: str = _f("auto", "auto | sd15 | sdxl (auto reads model_index.json)")
    vae: str = _f("", "separate VAE folder or hub id (SDXL: madebyollin/sdxl-vae-fp16-fix); empty = the pipeline's")
    dtype: str = _f("fp32", "weights dtype of the frozen parts: fp32 | bf16 | fp16 (LoRA weights stay fp32)")
    resolution: int = _f(0, "image resolution; 0 = the UNet's sample_size times the VAE factor")
    lora_rank: int = _f(4, "LoRA rank (official SD1.5: 4, SDXL: 64); 0 = full fine-tuning with a frozen copy")
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 = equal to the rank (official)")
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA adapters")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward (less memory, ~30% slower)")
    attention: str = _f("auto", "auto | sdpa | xformers: attention backend (auto = xformers if it runs, else SDPA)")
    compile: bool = _f(
        False,
        "torch.compile the UNet: the training forward and backward, the reference, and sampling with the VAE decoder "
        "where no CUDA graphs run (the first iterations pay the compilation: minutes on a CPU)",
    )
    compile_backend: str = _f("inductor", "torch.compile backend with model.compile (aot_eager: no code generation)")


@dataclass
class PreferenceConfig:
    kind: str = _f("toy", "toy (analytic scorer of the toy world) | step_aware (official SPM checkpoint)")
    backbone: str = _f("yuvalkirstain/PickScore_v1", "CLIP backbone (folder or hub id) of the step-aware model")
    processor: str = _f("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP processor/tokenizer folder or hub id")
    checkpoint: str = _f("", "official step-aware preference model checkpoint (.bin/.safetensors, 'model.' keys)")
    head: str = _f("", "noisy-latent preference head (head.pt of python -m spo_fast.train_head); empty = decode+score")
    verify_head: bool = _f(
        False,
        "with head: the head proposes each pool's pair, this preference model orders and validates it (it "
        "decodes and scores 2 of the k candidates)",
    )
    head_max_timestep: int = _f(
        1000,
        "with head: the head scores the steps at or below this timestep, this preference model (decode + score) the "
        "noisier ones, where a noisy-latent head is least accurate (1000: the head scores every step)",
    )
    head_refresh: int = _f(
        0,
        "with a direction head: record this preference model's gradient at the pool means on every N-th scored step "
        "and fine-tune the head on them after each iteration, so it follows the policy's pools (0: off; toy: 3)",
    )
    head_refresh_steps: int = _f(
        5, "head optimizer steps per iteration when head_refresh > 0 (0: the head stays as trained)"
    )
    head_refresh_lr: float = _f(1e-3, "AdamW learning rate of the head refresh")
    head_refresh_buffer: int = _f(200, "scored steps (b pools each) the head refresh draws its batches from")
    head_refresh_teacher_labels: bool = _f(
        True,
        "head refresh: the refreshed steps' pools are labelled by the teacher's gradient (computed for the refresh "
        "anyway), the others by the head; false: every label from the head",
    )
    head_refresh_carry: bool = _f(
        True, "head refresh: steps between refreshed ones are labelled by the pass's last teacher gradient"
    )
    head_refresh_through_unet: bool = _f(
        False,
        "head refresh: true lets the teacher's gradient flow back through the lookahead's UNet calls (the exact "
        "gradient, ~3x the UNet cost); false holds their outputs constant (the x0-space gradient carried by the DDIM "
        "algebra: forward passes only; toy: the same learning curve, 2.65x instead of 2.38x the official loop)",
    )
    head_audit_every: int = _f(
        0,
        "with head: on every N-th iteration also score the head-labelled pools with this preference model (decode "
        "+ score, as without a head; the pairs do not change) and log the labels' agreement with it on the policy's "
        "own pools, per timestep bucket (metrics.jsonl head_audit): shows a head drifting as the policy moves, at "
        "the teacher's sampling cost on those iterations (0: off)",
    )


@dataclass
class DataConfig:
    prompts: str = _f("toy", "prompt file (.json with 'caption', .txt, .csv, .parquet) or 'toy' (toy train split)")
    column: str = _f("", "column / key of the prompt in json, csv and parquet files; empty = caption, prompt or text")
    eval_prompts: str = _f("toy", "held-out prompts for evaluation: a file, 'toy', or '' to skip evaluation")
    num_eval_prompts: int = _f(32, "how many held-out prompts to evaluate (evenly spaced over the list)")


@dataclass
class SamplingConfig:
    num_steps: int = _f(20, "DDIM steps per trajectory")
    eta: float = _f(1.0, "DDIM stochasticity (SPO: 1.0)")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale for sampling (and training when train_cfg)")
    num_candidates: int = _f(4, "k: candidates per pool")
    divert_step: int = _f(4, "first step that branches into a pool")
    inner_steps: int = _f(0, "extra steps each candidate takes before scoring (SDXL recipe: 3)")
    threshold: float = _f(0.3, "a pair is valid when the softmax margin of (best, worst) exceeds this")
    lookahead_steps: int = _f(
        1,
        "x0 the scorer sees: 1 = one-step prediction (official); n = n deterministic DDIM jumps to t=0 (n-1 more UNet)",
    )
    batch_size: int = _f(8, "prompts per sampling pass (per process)")
    passes_per_iteration: int = _f(1, "sampling passes before each training phase")


@dataclass
class TrainConfig:
    method: str = _f("spo", "spo (step-wise pools) | dpo (trajectory-level baseline, Diffusion-DPO/D3PO style)")
    iterations: int = _f(60, "sample-then-train iterations")
    batch_size: int = _f(16, "pairs per optimizer micro-batch (per process)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    inner_epochs: int = _f(1, "passes over each iteration's pairs")
    lr: float = _f(1e-4, "AdamW learning rate")
    adam_betas: list = _f([0.9, 0.999], "AdamW betas")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 disables it (the official trainer never clips)")
    warmup_steps: int = _f(0, "linear warm-up optimizer steps before the constant learning rate")
    beta: float = _f(10.0, "SPO/DPO inverse temperature")
    eps: float = _f(0.1, "ratio clip: ratios are clamped to [1 - eps, 1 + eps]")
    train_cfg: bool = _f(True, "apply CFG to policy and reference predictions in the loss (official)")
    reference_batches: int = _f(
        4,
        "micro-batches whose frozen-reference predictions one no-grad forward computes, ahead of their optimizer "
        "steps (same values, fewer and larger forwards); 1 = one reference forward per micro-batch (official)",
    )
    mixed_precision: str = _f("no", "no | bf16: autocast the UNet forwards")
    seed: int = _f(0, "seed of every random stream (prompts, noise, continuation, shuffling)")
    device: str = _f("auto", "auto | cpu | cuda")


@dataclass
class LogConfig:
    output_dir: str = _f("outputs/spo_toy", "run folder: config, metrics.jsonl, checkpoints, LoRA, report")
    checkpoint_every: int = _f(10, "iterations between checkpoints (the last iteration always saves)")
    eval_every: int = _f(20, "iterations between held-out evaluations (0 = only before and after)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    tensorboard: bool = _f(False, "also log to tensorboard (needs the tensorboard package)")
    wandb: bool = _f(False, "also log to Weights & Biases (needs the wandb package)")
    progress: bool = _f(True, "tqdm progress bars")


@dataclass
class SPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preset: str = _f("toy", "the preset these values started from")


# Presets: "toy" is the built-in demo; sd15 / sdxl carry the official hyper-parameters (DESIGN.md section 2).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The toy world's preference is an analytic score of finished images: judged on the blurry one-step x0 at high
    # noise it labels the wrong candidates (divert 4, threshold 0.05: held-out 4.10 -> 2.45 in 20 iterations), so the
    # toy preset scores a 2-jump lookahead x0 (4.10 -> 4.67 in 40 iterations at lr 6e-4, measured). Candidates of one
    # pool differ little in score on this world, hence the lower threshold (raw score gap ~0.01 at scale 10).
    "toy": {
        "sampling": {"divert_step": 4, "threshold": 0.05, "lookahead_steps": 2},
        "train": {"lr": 6e-4, "iterations": 40},
        "log": {"eval_every": 20},
    },
    "sd15": {
        "model": {"pretrained": "runwayml/stable-diffusion-v1-5", "kind": "sd15", "lora_rank": 4, "dtype": "fp16"},
        "preference": {"kind": "step_aware"},
        "data": {"prompts": "4k_training_prompts.json", "eval_prompts": "", "num_eval_prompts": 16},
        "sampling": {"num_candidates": 4, "divert_step": 4, "threshold": 0.3, "batch_size": 10},
        "train": {"lr": 6e-5, "batch_size": 10, "grad_accum": 1, "iterations": 4000, "mixed_precision": "bf16"},
        "log": {"output_dir": "outputs/spo_sd15", "checkpoint_every": 100, "eval_every": 0},
    },
    "sdxl": {
        "model": {
            "pretrained": "stabilityai/stable-diffusion-xl-base-1.0",
            "kind": "sdxl",
            "vae": "madebyollin/sdxl-vae-fp16-fix",
            "lora_rank": 64,
            "dtype": "fp16",
        },
        "preference": {"kind": "step_aware"},
        "data": {"prompts": "4k_training_prompts.json", "eval_prompts": "", "num_eval_prompts": 8},
        "sampling": {"num_candidates": 2, "divert_step": 4, "threshold": 0.4, "inner_steps": 3, "batch_size": 2},
        "train": {"lr": 1e-5, "batch_size": 2, "grad_accum": 2, "iterations": 4000, "mixed_precision": "bf16"},
        "log": {"output_dir": "outputs/spo_sdxl", "checkpoint_every": 100, "eval_every": 0},
    },
}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _valid_keys() -> list[str]:
    out = []
    for sec in fields(SPOConfig):
        if dataclasses.is_dataclass(sec.default_factory):  # type: ignore[arg-type]
            out += [f"{sec.name}.{f.name}" for f in fields(sec.default_factory)]  # type: ignore[arg-type]
        else:
            out.append(sec.name)
    return out


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true/false, got {value!r}")
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else value.split(",")
            return [type(current[0])(v) if current else v for v in value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key} expects a {type(current).__name__}, got {value!r}") from e
    return str(value)


def _set(cfg: SPOConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] == "preset":
        cfg.preset = str(value)
        return
    if len(parts) != 2 or not hasattr(cfg, parts[0]) or not hasattr(getattr(cfg, parts[0]), parts[1]):
        raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(_valid_keys())}")
    section = getattr(cfg, parts[0])
    setattr(section, parts[1], _coerce(value, getattr(section, parts[1]), key))


def apply_overrides(cfg: SPOConfig, overrides: dict[str, Any]) -> SPOConfig:
    """Apply ``{"section.key": value}`` or nested ``{"section": {"key": value}}`` overrides in place."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            if key not in ("model", "preference", "data", "sampling", "train", "log"):
                raise ValueError(f"unknown config section {key!r}; valid keys: {', '.join(_valid_keys())}")
            for k, v in value.items():
                _set(cfg, f"{key}.{k}", v)
        else:
            _set(cfg, key, value)
    return cfg


def config_from_dict(d: dict[str, Any]) -> SPOConfig:
    return apply_overrides(SPOConfig(), d)


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def make_config(
    preset: str = "toy", file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> SPOConfig:
    """Preset, then the file, then the overrides (later wins)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = SPOConfig(preset=preset)
    apply_overrides(cfg, PRESETS[preset])
    if file:
        data = load_config_file(file)
        data.pop("preset", None)
        apply_overrides(cfg, data)
    apply_overrides(cfg, overrides or {})
    return cfg


def config_hash(cfg: SPOConfig, ignore: tuple[str, ...] = ("log.progress", "train.iterations")) -> str:
    """Hash of the resolved config (ranks compare it; a run folder refuses a different config)."""
    d = config_to_dict(cfg)
    for key in ignore:
        sec, k = key.split(".")
        d[sec].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def field_help() -> dict[str, str]:
    """``{"section.key": help}`` for the CLI."""
    out = {}
    for sec in fields(SPOConfig):
        if sec.name == "preset":
            continue
        cls = sec.default_factory  # type: ignore[misc]
        hints = get_type_hints(cls)
        for f in fields(cls):
            out[f"{sec.name}.{f.name}"] = f"{f.metadata.get('help', '')} [{getattr(hints[f.name], '__name__', '')}]"
    return out
