"""End-to-end SPO iteration: the official formulation against spo_fast's fast path, side by side in one process.

One iteration = sample a batch of prompts with pools (DESIGN.md section 2), then train on all its pairs. The official
SD1.5 configuration: 10 prompts, k = 4, 20 DDIM steps, divert step 4, CFG 5, LoRA rank 4, train batch 10.

Modes (``--modes``, run in the given order, each on freshly built models so peak memory is its own):

official   what the official trainer does: text encoder run every sampling pass (no prompt cache), VAE decode plus
           the step-aware preference model on every candidate of every scored step with the prompt's text features
           recomputed on each call, a deep-copied reference UNet, four UNet passes per pair (policy and reference,
           each for win and for lose), four separate ``spo_fast.ddim_step_log_prob`` evaluations, no gradient
           clipping (the official clip is a no-op), official precision (fp16 weights + autocast on CUDA).
fast       the library path: ``SPOTrainer.sample_pairs`` (cached prompt embeddings, cached SPM text features, the
           batched pool sampler) and ``SPOTrainer.train_on`` (one policy and one reference forward per pair, the
           reference being the same UNet with LoRA adapters disabled, closed-form / fused loss); on CUDA also CUDA
           graphs for the sampler's denoiser, bf16, TF32 and the attention backend of ``--attention``.

fast+head  the fast path with the noisy-latent preference head (``spo_fast.head``, latent encoder) in the sampler: per
           scored step the head scores the k*b noisy candidates and the UNet runs (with CFG) only on the b
           continuations; no VAE decode and no SPM in the loop. Training is the fast path's. The head has random
           weights here (timing only; ``python -m spo_fast.train_head`` trains one): with ``--threshold 0`` every
           scored step pairs, so the pair count equals the other modes'.

fast+head_verify  the fast path with the verified head: the head scores the k*b noisy candidates and proposes each
           pool's pair; only those 2b candidates get the x0 estimate, the VAE decode and the SPM (which orders the
           pair), and the UNet runs on the b continuations.

fast+head_refresh  the head with its online refresh (``preference.head_refresh 3``) and the exact teacher gradient
           (``preference.head_refresh_through_unet true``): on every 3rd scored step the SPM's gradient at the pool
           means (through the policy's x0 estimate and its UNet calls, the VAE decoder and the SPM; counted in the
           phase ``score``), and after training ``--refresh-steps`` head optimizer steps (phase ``head_refresh``).

fast+head_refresh_x0  the same with the library default ``head_refresh_through_unet false``: the SPM's gradient stops
           at the lookahead's UNet outputs (forward passes only, on the sampler's no-grad denoiser: phase ``unet``).

``--head-max-timestep T`` (every head mode): the decode + SPM scorer takes the scored steps above T, as in the fast
path, and the head the rest (``preference.head_max_timestep``).

Both modes draw the same prompts, noise and resampler choices for the same ``--seed``, so they produce the same number
of pairs. Random-weight preference models give arbitrary margins, so ``--threshold`` defaults to 0 (every scored step
yields a pair: the largest training phase, b * (N - divert) pairs).

Reported per mode: seconds per iteration (median over ``--iters`` timed iterations after ``--warmup``), the phase
breakdown (sampling: unet / decode / score / other; training), peak memory (CUDA allocator peak; on CPU the peak
resident set size above the mode's start, approximate), images per second (candidate images the sampler produced and
scored, k * b per scored step, over the whole iteration), pairs per second, UNet FLOPs executed (counted with
``torch.utils.flop_counter`` on one forward and one LoRA forward+backward) and MFU (the UNet FLOPs the fast path needs
per iteration over the iteration time and the device's dense bf16 peak; CUDA only).

``--scale full`` builds SD1.5-architecture models (UNet, VAE, CLIP-L text encoder) and a CLIP-ViT-H/14-sized step-aware
preference model from configs with random weights (timing only; nothing is downloaded). ``--scale small`` runs the
same at tiny sizes on CPU in seconds (the CI smoke test).

A spo_fast mode with the suffix ``@compile`` (``fast@compile``, ``fast+head@compile``, ...) runs with
``model.compile``: torch.compile (inductor) on the UNet's training and reference forwards, and on sampling where no
CUDA graphs run. Its warm-up iterations pay the compilation (minutes on a CPU; inductor's cache makes a rerun
quicker); the JSON records the graphs built in warm-up and in timed iterations (``compiled_graphs_timed`` must be 0,
else raise ``--warmup``; ``TORCH_LOGS=recompiles`` says why).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import environment, print_table, sync, write_json
from torch import Tensor

import spo_fast
from spo_fast.attention import configure_attention
from spo_fast.config import PreferenceConfig, make_config
from spo_fast.cuda_graphs import GraphedDenoiser, maybe_graph
from spo_fast.ledger import PairLedger
from spo_fast.loss import spo_loss_from_log_ratios
from spo_fast.pipeline import CFGDenoiser, PromptEncoder, add_lora, load_components
from spo_fast.precision import autocast, enable_tf32, resolve_dtype
from spo_fast.preference.step_aware import StepAwarePreferenceModel, tiny_clip_config, write_tiny_clip_tokenizer
from spo_fast.sampler import PoolPairs, PoolSampler, PoolSamplerConfig
from spo_fast.trainer import SPOTrainer, _stream_seed

logger = logging.getLogger("bench_e2e")

# Dense bf16 tensor-core peak FLOP/s by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
    ("A10G", 125e12),
    ("L4", 121e12),
]
WORDS = "red green blue yellow purple cat dog bird house tree car boat small large two three on under near by".split()


# ------------------------------------------------------------------------------------------------------ models


def _sd15_configs(scale: str) -> tuple[dict, dict, dict, int]:
    """(unet, vae, text encoder) configs and the tokenizer length of SD1.5 (full) or a tiny SD1.5 look-alike."""
    if scale == "full":
        unet = dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )  # fmt: skip
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )  # fmt: skip
        text = dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768,
        )  # fmt: skip
        return unet, vae, text, 77
    unet = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8, cross_attention_dim=16,
    )  # fmt: skip
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip
    text = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
        projection_dim=16,
    )  # fmt: skip
    return unet, vae, text, 16


def build_pipeline(folder: Path, scale: str, seed: int) -> Path:
    """An SD1.5-structured diffusers pipeline with random weights, saved to ``folder`` (loaded back by both modes
    through ``spo_fast.pipeline.load_components``, the path real checkpoints take)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet_cfg, vae_cfg, text_cfg, max_len = _sd15_configs(scale)
    write_tiny_clip_tokenizer(folder / "_tok", model_max_length=max_len)
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    text_cfg.setdefault("vocab_size", len(tok))
    te = CLIPTextModel(
        CLIPTextConfig(**text_cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=1)
    )
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=te, tokenizer=tok, unet=UNet2DConditionModel(**unet_cfg),
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def build_spm(folder: Path, scale: str, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A step-aware preference model with random weights: CLIP-ViT-H/14 sizes (the paper's PickScore backbone) at
    full scale, the golden tiny model's sizes at small scale."""
    from transformers import CLIPModel

    tok = write_tiny_clip_tokenizer(folder / "spm_tok", model_max_length=77 if scale == "full" else 16)
    if scale == "full":
        config = tiny_clip_config(
            vocab_size=49408, eos_token_id=tok.eos_token_id, projection_dim=1024,
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                             max_position_embeddings=77),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                               image_size=224, patch_size=14),
        )  # fmt: skip
    else:
        config = tiny_clip_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # random init directly on the GPU: seconds instead of a minute for ViT-H on CPU
        clip = CLIPModel(config)
    spm = StepAwarePreferenceModel(clip, tokenizer=tok)
    spm.reset_time_conditioning(std=0.05, generator=torch.Generator().manual_seed(seed))
    return spm.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ timing


@dataclass
class Timer:
    """Accumulates seconds per phase name; synchronises CUDA around each section so phases do not overlap."""

    device: torch.device
    totals: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.totals = {}


class TimedDenoiser:
    """Times the sampler's denoiser calls (phase ``unet``) and counts the latent rows it was given."""

    def __init__(self, denoiser: Callable[..., Tensor], timer: Timer) -> None:
        self.denoiser, self.timer, self.rows = denoiser, timer, 0

    def __call__(self, latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        self.rows += latents.shape[0]
        with self.timer.section("unet"):
            return self.denoiser(latents, timesteps, cond)


class TimedDecodeScorer:
    """VAE decode (phase ``decode``) then the step-aware preference model (phase ``score``) on predicted x0.

    ``cache_text=False`` is the official scorer: it tokenizes and runs the SPM text tower on every call.
    """

    def __init__(self, components: Any, spm: Any, timer: Timer, cache_text: bool, decode_batch: int = 64) -> None:
        self.components, self.spm, self.timer = components, spm, timer
        self.cache_text, self.decode_batch = cache_text, decode_batch
        self.prompts: list[str] = []
        self.images = 0

    @torch.no_grad()
    def __call__(self, x0: Tensor, timesteps: Tensor, prompt_index: Tensor) -> Tensor:
        with self.timer.section("decode"):
            images = torch.cat(
                [
                    self.components.decode(x0[s : s + self.decode_batch])
                    for s in range(0, x0.shape[0], self.decode_batch)
                ]
            )
        self.images += images.shape[0]
        prompts = [self.prompts[i] for i in prompt_index.tolist()]
        with self.timer.section("score"):
            if self.cache_text:
                return self.spm.score(images, timesteps, prompts).float()
            return self.spm.score_input_ids(images, timesteps, self.spm.tokenize(prompts)).float()


# ------------------------------------------------------------------------------------------------------ memory


def _allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # the CPU allocator keeps no statistics; state_bytes is reported instead
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _state_bytes(*modules: Any) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _failure(exc: Exception, where: str, device: torch.device) -> str:
    """Log a mode's failure and free what it held; the message goes into the JSON's ``failed_modes``."""
    logger.exception("mode failed in its %s", where)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f"{where}: {type(exc).__name__}: {exc}"[:2000]


def run_timed(mode: Mode, it: int, device: torch.device, record: bool) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    graphs = _compiled_graphs()
    rec = mode.iteration(it)
    if device.type == "cuda":
        mode.iteration_peak_bytes = max(mode.iteration_peak_bytes, torch.cuda.max_memory_allocated() - base)
    if record:
        mode.records.append(rec)
    if mode.details.get("compile"):
        # Graphs torch.compile built during this iteration: a timed iteration that compiles is not a steady state.
        built = _compiled_graphs() - graphs
        key = "compiled_graphs_timed" if record else "compiled_graphs_warmup"
        mode.details[key] = mode.details.get(key, 0) + built
        if record and built:
            logger.warning("iteration %d compiled %d new graph(s): raise --warmup", it, built)
    # Progress in the log: a run stopped by a time limit still shows what each iteration cost.
    phases = " ".join(f"{k} {v:.2f}" for k, v in rec.phases.items())
    logger.info(
        "iteration %d%s: %.2f s, %d pairs (%s)", it, "" if record else " (warm-up)", rec.seconds, rec.pairs, phases
    )


# ------------------------------------------------------------------------------------------------------ FLOPs


def unet_flops_per_row(unet: Any, latent_shape: tuple[int, ...], cond_len: int, cond_dim: int, device, dtype) -> dict:
    """UNet FLOPs per latent row: a no-grad forward, and a LoRA-training forward + backward (input gradients flow
    through the whole network; only the LoRA weights get weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *latent_shape, device=device, dtype=dtype)
    t = torch.full((2,), 500, device=device, dtype=torch.long)
    c = torch.randn(2, cond_len, cond_dim, device=device, dtype=dtype)
    with torch.no_grad(), autocast(device, dtype), FlopCounterMode(display=False) as fwd:
        unet(x, t, encoder_hidden_states=c)
    with FlopCounterMode(display=False) as train:
        with autocast(device, dtype):
            out = unet(x, t, encoder_hidden_states=c).sample
        out.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return {"forward": fwd.get_total_flops() / 2, "train": train.get_total_flops() / 2}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


# ------------------------------------------------------------------------------------------------------ modes


@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    folder: Path
    prompts_file: Path
    prompts: list[str]


@dataclass
class IterationRecord:
    phases: dict[str, float]
    seconds: float
    pairs: int
    images: int
    sampling_rows: int  # latent rows through the UNet while sampling, CFG doubling included
    training_rows: dict[str, int]  # rows of no-grad forwards and of forward+backward passes while training


@dataclass
class Mode:
    """A built mode: ``iteration(it)`` runs one timed SPO iteration. Memory: ``build_bytes`` is what building its
    models allocated on the device; ``peak_memory_bytes`` adds the largest per-iteration peak above that."""

    iteration: Callable[[int], IterationRecord]
    flops_per_row: dict[str, float]
    details: dict[str, Any]
    state_bytes: Callable[[], int]  # parameters, buffers and optimizer state of every model the mode holds
    build_bytes: int | None = None
    iteration_peak_bytes: int = 0
    records: list[IterationRecord] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None

    @property
    def peak_memory_bytes(self) -> int | None:
        return None if self.build_bytes is None else self.build_bytes + self.iteration_peak_bytes


def _config(setup: Setup, dtype: str, mixed: str, out: Path, compile: bool = False) -> Any:
    a = setup.args
    return make_config(
        "sd15",
        overrides={
            "model": {"pretrained": str(setup.folder), "kind": "sd15", "dtype": dtype, "attention": a.attention,
                      "compile": compile},
            "preference": {"kind": "toy"},  # replaced by the bench's SPM through SPOTrainer(image_scorer=...)
            "data": {"prompts": str(setup.prompts_file), "eval_prompts": ""},
            "sampling": {"batch_size": a.prompts, "num_candidates": a.k, "num_steps": a.steps,
                         "divert_step": a.divert, "guidance_scale": a.cfg, "threshold": a.threshold},
            "train": {"batch_size": a.train_batch, "mixed_precision": mixed, "seed": a.seed,
                      "device": str(setup.device), "iterations": 1},
            "log": {"output_dir": str(out), "progress": False},
        },
    )  # fmt: skip


def build_official(setup: Setup) -> Mode:
    a, dev = setup.args, setup.device
    dtype = resolve_dtype(a.official_dtype if dev.type == "cuda" else "fp32", dev)
    cfg = _config(setup, "fp32", "no", setup.folder / "unused")
    s, t = cfg.sampling, cfg.train
    base = _allocated(dev)
    torch.manual_seed(a.seed)  # the same LoRA initialisation as the fast mode's trainer
    comps = load_components(str(setup.folder), "sd15", dtype, device=dev)
    params = add_lora(comps.unet, cfg.model.lora_rank, None, cfg.model.lora_targets)
    ref_unet = copy.deepcopy(comps.unet).requires_grad_(False)  # the official reference: a second full UNet
    spm = build_spm(setup.folder, a.scale, dev, dtype, a.seed)
    flops = unet_flops_per_row(comps.unet, comps.latent_shape, *_cond_shape(comps), dev, dtype)
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, eps=t.adam_eps)
    encoder = PromptEncoder(comps, device=dev)
    uncond = encoder._encode([""])  # the official code encodes the negative prompt once
    policy, reference = (
        CFGDenoiser(comps.unet, uncond, s.guidance_scale),
        CFGDenoiser(ref_unet, uncond, s.guidance_scale),
    )
    timer = Timer(dev)

    def sample_fn(x: Tensor, ts: Tensor, cond: Any) -> Tensor:
        with autocast(dev, dtype):
            return policy(x, ts, cond)

    denoiser = TimedDenoiser(sample_fn, timer)
    scorer = TimedDecodeScorer(comps, spm, timer, cache_text=False)
    sc = PoolSamplerConfig(s.num_steps, s.num_candidates, s.divert_step, s.inner_steps, s.threshold, s.eta)
    sampler = PoolSampler(denoiser, comps.scheduler, scorer, sc)
    ledger = PairLedger(seed=t.seed)

    def iteration(it: int) -> IterationRecord:
        timer.reset()
        denoiser.rows, scorer.images = 0, 0
        t0 = time.perf_counter()
        with timer.section("sampling"):
            # The same prompt / noise / resampler streams as SPOTrainer.sample_pairs, so both modes see equal work.
            g = torch.Generator().manual_seed(_stream_seed(t.seed, it, 0, 1))
            ids = torch.randint(0, len(setup.prompts), (s.batch_size,), generator=g)
            prompts = [setup.prompts[i] for i in ids.tolist()]
            with timer.section("text_encoder"):
                cond = encoder._encode(prompts)  # no cache: the text encoder runs every pass
            scorer.prompts = prompts
            gen = torch.Generator(device=dev).manual_seed(_stream_seed(t.seed, it, 0, 2))
            latents = torch.randn((len(prompts), *comps.latent_shape), generator=gen, device=dev)
            latents = latents * comps.scheduler.init_noise_sigma
            res = sampler.sample(cond, latents, gen, ledger, it, ids, seed=_stream_seed(t.seed, 0))
        pairs = res.pairs
        with timer.section("training"):
            n = len(pairs)
            order = ledger.epoch_order(it, n)
            comps.unet.train()
            for i in range(0, n, t.batch_size):
                mb: PoolPairs = pairs.select(order[i : i + t.batch_size]).to(dev)
                c = cond[mb.prompt_index.cpu()]  # the official trainer reuses the sampling pass's embeddings
                x, ts = mb.parent_win, mb.timesteps.to(dev)
                with autocast(dev, dtype):
                    pw = policy(x, ts, c).float()
                    pl = policy(x, ts, c).float()
                    with torch.no_grad():
                        rw = reference(x, ts, c).float()
                        rl = reference(x, ts, c).float()
                lp_pw = spo_fast.ddim_step_log_prob(comps.scheduler, pw, ts, x, mb.win, s.eta)
                lp_pl = spo_fast.ddim_step_log_prob(comps.scheduler, pl, ts, x, mb.lose, s.eta)
                lp_rw = spo_fast.ddim_step_log_prob(comps.scheduler, rw, ts, x, mb.win, s.eta)
                lp_rl = spo_fast.ddim_step_log_prob(comps.scheduler, rl, ts, x, mb.lose, s.eta)
                per_pair, _, _ = spo_loss_from_log_ratios(lp_pw - lp_rw, lp_pl - lp_rl, t.beta, t.eps)
                per_pair.mean().backward()
                opt.step()  # no clipping: the official clip_grad_norm_ sees an exhausted iterator (a no-op)
                opt.zero_grad(set_to_none=True)
            comps.unet.eval()
        sync(dev)
        cfg_mult = 2 if s.guidance_scale > 1 else 1
        return IterationRecord(
            _phases(timer.totals), time.perf_counter() - t0, n, scorer.images, denoiser.rows * cfg_mult,
            {"forward": 2 * n * cfg_mult, "train": 2 * n * cfg_mult},
        )  # fmt: skip

    built = _allocated(dev)
    return Mode(
        iteration, flops, {"dtype": str(dtype).replace("torch.", "")},
        lambda: _state_bytes(comps.unet, ref_unet, comps.vae, *comps.text_encoders, spm) + _optimizer_bytes(opt),
        None if base is None else built - base,
    )  # fmt: skip


def build_fast(setup: Setup) -> Mode:
    return _build_fast(setup)[0]


def _build_fast(setup: Setup) -> tuple[Mode, SPOTrainer, Timer]:
    """The fast mode, plus its trainer and timer (build_fast_head re-plumbs the trainer's sampler)."""
    a, dev = setup.args, setup.device
    dtype = resolve_dtype(a.fast_dtype if dev.type == "cuda" else "fp32", dev)
    dname = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if dev.type == "cuda":
        enable_tf32()
    base = _allocated(dev)
    spm = build_spm(setup.folder, a.scale, dev, dtype, a.seed)
    torch.manual_seed(a.seed)  # the same LoRA initialisation as the official mode
    out = tempfile.TemporaryDirectory()
    mixed = "bf16" if dtype == torch.bfloat16 else "no"
    cfg = _config(setup, dname, mixed, Path(out.name) / "run", a.compile)
    trainer = SPOTrainer(cfg, image_scorer=spm)
    comps = trainer.components
    attention = configure_attention(comps.unet, a.attention)
    flops = unet_flops_per_row(comps.unet, comps.latent_shape, *_cond_shape(comps), dev, dtype)
    timer = Timer(dev)
    graphed = maybe_graph(trainer.sampler.denoiser, dev, enabled=None if a.cuda_graphs else False)
    denoiser = TimedDenoiser(graphed, timer)
    scorer = TimedDecodeScorer(comps, spm, timer, cache_text=True)
    trainer.sampler.denoiser = denoiser
    trainer.sampler.scorer = trainer.scorer = scorer
    s = cfg.sampling

    def iteration(it: int) -> IterationRecord:
        timer.reset()
        denoiser.rows, scorer.images = 0, 0
        t0 = time.perf_counter()
        with timer.section("sampling"):
            pairs, prompts, _ = trainer.sample_pairs(it)
        with timer.section("training"):
            trainer.train_on(pairs, prompts, it)
        sync(dev)
        n, cfg_mult = len(pairs), 2 if s.guidance_scale > 1 else 1
        return IterationRecord(
            _phases(timer.totals), time.perf_counter() - t0, n, scorer.images, denoiser.rows * cfg_mult,
            {"forward": n * cfg_mult, "train": n * cfg_mult},
        )  # fmt: skip

    details = {
        "dtype": dname,
        "attention": attention,
        "cuda_graphs": graphed.stats if isinstance(graphed, GraphedDenoiser) else None,
        "loss_impl": spo_fast.loss_impl(),
        "compile": cfg.model.compile_backend if cfg.model.compile else None,
    }
    built = _allocated(dev)

    def state() -> int:
        return _state_bytes(comps.unet, comps.vae, *comps.text_encoders, spm) + _optimizer_bytes(trainer.optimizer)

    mode = Mode(iteration, flops, details, state, None if base is None else built - base, cleanup=out.cleanup)
    return mode, trainer, timer


class TimedHead:
    """Times the head's scoring calls (phase ``score``) and counts the candidates it scored."""

    def __init__(self, head: Any, timer: Timer) -> None:
        self.head, self.timer, self.images = head, timer, 0

    def __call__(
        self, latents: Tensor, timesteps: Tensor, cond: Any, prompt_index: Tensor, parent_x0: Tensor | None = None
    ) -> Tensor:
        self.images += latents.shape[0]
        with self.timer.section("score"):
            return self.head(latents, timesteps, cond, prompt_index, parent_x0=parent_x0)


def head_arch(comps: Any, scale: str, width: int | None = None) -> Any:
    """The head the fast+head mode times: the direction head (the chosen design, see spo_fast.head; its conv net runs
    on the b pool means), as train_head builds it by default (the potential head: a forward and a backward of the
    small net per scored step), 128 wide at full scale, and the toy default (32 wide, 3 blocks) at small scale;
    ``width`` overrides the width (``--head-width``)."""
    from spo_fast.head import HeadArchConfig, scheduler_signature
    from spo_fast.train_head import HeadTrainConfig

    full = scale == "full"
    return HeadArchConfig(
        encoder="direction", latent_channels=int(comps.unet.config.in_channels),
        text_dim=sum(int(e.config.hidden_size) for e in comps.text_encoders), width=width or (128 if full else 32),
        depth=4 if full else 3, downsample=0, embed_dim=128 if full else 64,
        potential=HeadTrainConfig().model.potential, scheduler=scheduler_signature(comps.scheduler),
    )  # fmt: skip


def build_fast_head(setup: Setup, verify: bool = False, refresh: bool = False, through_unet: bool = False) -> Mode:
    from spo_fast.head import HeadScorer, NoisyLatentPreferenceHead, RefreshingHeadScorer

    mode, trainer, timer = _build_fast(setup)
    comps = trainer.components
    torch.manual_seed(setup.args.seed)
    head = NoisyLatentPreferenceHead(head_arch(comps, setup.args.scale, setup.args.head_width)).to(setup.device)
    if refresh:
        scorer: Any = RefreshingHeadScorer(
            head,
            comps,
            trainer.image_scorer,
            trainer._policy_grad,
            lambda ps: trainer.encoder(ps).embeds,
            every=setup.args.refresh_every,
            steps=setup.args.refresh_steps,
            through_unet=through_unet,
        )
    else:
        scorer = HeadScorer(head)
    timed = TimedHead(scorer, timer)
    old = trainer.sampler
    # Verified: the head proposes each pool's pair, the (timed) decode + SPM scorer orders only those two. Gated
    # (--head-max-timestep): the decode + SPM scorer takes the steps above that timestep.
    gated = setup.args.head_max_timestep is not None
    trainer.sampler = PoolSampler(
        old.denoiser, old.scheduler, old.scorer if verify or gated else None, old.config, head=timed,
        verify_head=verify, head_max_timestep=setup.args.head_max_timestep,
    )  # fmt: skip
    if refresh:
        scorer.sampler, scorer.prompts = trainer.sampler, trainer.scorer
        trainer.head_refresher = scorer
    inner = mode.iteration

    def iteration(it: int) -> IterationRecord:
        timed.images = 0
        rec = inner(it)
        rec.images = timed.images
        if refresh:
            t0 = time.perf_counter()
            with timer.section("head_refresh"):
                trainer.refresh_head()
            sync(setup.device)
            spent = time.perf_counter() - t0
            rec.seconds += spent
            rec.phases["head_refresh"] = spent
        return rec

    mode.iteration = iteration
    if not verify and not gated:
        # What the head mode needs while training: no SPM, and the VAE only for evaluation (not counted, as for the
        # SPM).
        mode.state_bytes = lambda: (
            _state_bytes(comps.unet, *comps.text_encoders, head) + _optimizer_bytes(trainer.optimizer)
        )
    mode.details["head_parameters"] = sum(p.numel() for p in head.parameters())
    mode.details["head_width"] = head.config.width
    mode.details["head_potential"] = head.config.potential
    mode.details["head_score_rule"] = "value" if head.scores_by_value else "gradient"
    return mode


RUNNERS: dict[str, Callable[[Setup], Mode]] = {
    "official": build_official,
    "fast": build_fast,
    "fast+head": build_fast_head,
    "fast+head_verify": lambda setup: build_fast_head(setup, verify=True),
    "fast+head_refresh": lambda setup: build_fast_head(setup, refresh=True, through_unet=True),
    "fast+head_refresh_x0": lambda setup: build_fast_head(setup, refresh=True, through_unet=False),
}
PLANNED: dict[str, str] = {}
# The run's settings copied into the JSON.
CONFIG_KEYS = ("scale", "prompts", "k", "steps", "divert", "cfg", "train_batch", "threshold", "warmup", "iters",
               "refresh_every", "refresh_steps", "head_max_timestep", "head_width")  # fmt: skip


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, Tensor))


def _cond_shape(comps: Any) -> tuple[int, int]:
    te = comps.text_encoders[0]
    return comps.tokenizers[0].model_max_length, te.config.hidden_size


def _phases(totals: dict[str, float]) -> dict[str, float]:
    sampling = totals.get("sampling", 0.0)
    inner = sum(totals.get(k, 0.0) for k in ("unet", "decode", "score"))
    return {
        "sampling": sampling,
        "sampling_unet": totals.get("unet", 0.0),
        "sampling_decode": totals.get("decode", 0.0),
        "sampling_score": totals.get("score", 0.0),
        "sampling_other": max(0.0, sampling - inner),
        "training": totals.get("training", 0.0),
        "head_refresh": 0.0,  # the fast+head_refresh mode's head updates (set by its iteration)
    }


def summarise(name: str, res: Mode, device: torch.device) -> dict[str, Any]:
    recs = res.records
    med = {k: statistics.median(r.phases[k] for r in recs) for k in recs[0].phases}
    seconds = statistics.median(r.seconds for r in recs)
    f_fwd, f_train = res.flops_per_row["forward"], res.flops_per_row["train"]
    executed = statistics.median(
        r.sampling_rows * f_fwd + r.training_rows["forward"] * f_fwd + r.training_rows["train"] * f_train for r in recs
    )
    # Model FLOPs the iteration needs (the fast path's count: one policy and one reference pass per pair).
    needed = statistics.median(
        r.sampling_rows * f_fwd + (r.training_rows["train"] if name != "official" else r.training_rows["train"] // 2)
        * (f_fwd + f_train) for r in recs
    )  # fmt: skip
    peak = peak_flops(device)
    return {
        "mode": name,
        "seconds_per_iteration": seconds,
        # The fastest timed iteration: on a shared machine other tenants only ever add time, so the minimum is the
        # least disturbed measure of the work (timeit's choice); the median stays the headline.
        "seconds_per_iteration_min": min(r.seconds for r in recs),
        "iteration_seconds": [r.seconds for r in recs],
        "phases": med,
        "pairs_per_iteration": [r.pairs for r in recs],
        "images_per_iteration": recs[0].images,
        "images_per_second": statistics.median(r.images / r.seconds for r in recs),
        "pairs_per_second": statistics.median(r.pairs / r.seconds for r in recs),
        "peak_memory_bytes": res.peak_memory_bytes,
        "state_bytes": res.state_bytes(),
        "unet_flops_per_row": res.flops_per_row,
        "unet_tflops_executed": executed / 1e12,
        "unet_tflops_needed": needed / 1e12,
        "achieved_tflops_per_s": executed / seconds / 1e12,
        "mfu": needed / seconds / peak if peak else None,
        **res.details,
    }


# ------------------------------------------------------------------------------------------------------ main


def make_prompts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) for _ in range(n)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=("full", "small"), default="full", help="SD1.5 sizes, or tiny models on CPU")
    ap.add_argument(
        "--modes", nargs="+", default=["official", "fast"],
        help=f"of {sorted(RUNNERS)}; a spo_fast mode with the suffix '@compile' runs under model.compile",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=10, help="prompts per sampling pass (official: 10)")
    ap.add_argument("--k", type=int, default=4, help="candidates per pool (official SD1.5: 4)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--divert", type=int, default=4, help="divert (first branching) step")
    ap.add_argument("--cfg", type=float, default=5.0, help="guidance scale")
    ap.add_argument("--train-batch", type=int, default=10, help="pairs per optimizer step (official: 10)")
    ap.add_argument("--threshold", type=float, default=0.0, help="pair margin threshold (0: every step pairs)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode (graph capture, autotune)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per mode (default 3 small, 2 full)")
    ap.add_argument("--official-dtype", default="fp16", help="official precision on CUDA (its config: fp16)")
    ap.add_argument("--fast-dtype", default="bf16", help="fast-path precision on CUDA")
    ap.add_argument("--attention", default="auto", choices=("auto", "sdpa", "xformers"), help="fast-path attention")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="fast path without graphs")
    ap.add_argument("--refresh-every", type=int, default=3, help="fast+head_refresh: preference.head_refresh N")
    ap.add_argument(
        "--refresh-steps",
        type=int,
        default=PreferenceConfig().head_refresh_steps,
        help="fast+head_refresh: preference.head_refresh_steps (head optimizer steps per iteration)",
    )
    ap.add_argument(
        "--head-width", type=int, default=None, help="fast+head modes: the head's width (default: 32 small, 128 full)"
    )
    ap.add_argument(
        "--head-max-timestep",
        type=int,
        default=None,
        help="fast+head modes: preference.head_max_timestep (decode + SPM score the steps above it; default: none)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 at small scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_e2e.json)")
    ap.set_defaults(compile=False)  # set per mode by the '@compile' suffix
    args = ap.parse_args(argv)
    for m in args.modes:
        base, _, variant = m.partition("@")
        if base in PLANNED:
            ap.error(f"mode {base!r} is not available yet: {PLANNED[base]}")
        if base not in RUNNERS:
            ap.error(f"unknown mode {base!r}; choose from {sorted(RUNNERS)}")
        if variant and (variant != "compile" or base == "official"):
            ap.error(f"mode {m!r}: the only variant is '@compile', of a spo_fast mode (the official loop is eager)")
    if args.head_max_timestep is not None and args.head_max_timestep < 0:
        ap.error(
            f"--head-max-timestep must be >= 0 (0: the head scores only the final x_0), got {args.head_max_timestep}"
        )
    if args.head_width is not None and args.head_width < 1:
        ap.error(f"--head-width must be >= 1, got {args.head_width}")
    if args.iters is None:
        args.iters = 3 if args.scale == "small" else 2
    if args.threads is None and args.scale == "small":
        # Tiny ops gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spinning threads
        # make timings several times slower and noisier.
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_pipeline(Path(tmp) / "pipeline", args.scale, args.seed)
        prompts = make_prompts(64, args.seed)
        prompts_file = Path(tmp) / "prompts.txt"
        prompts_file.write_text("\n".join(prompts) + "\n")
        setup = Setup(args, device, folder, prompts_file, prompts)
        modes = {}
        for name in args.modes:
            t0 = time.perf_counter()
            base, _, variant = name.partition("@")
            mode_setup = setup
            if variant == "compile":
                mode_setup = dataclasses.replace(setup, args=argparse.Namespace(**{**vars(args), "compile": True}))
            try:
                modes[name] = RUNNERS[base](mode_setup)
            except Exception as exc:  # one mode that cannot run (e.g. out of memory) must not lose the others
                failed[name] = _failure(exc, "build", device)
                continue
            logger.info("built mode %s in %.1f s", name, time.perf_counter() - t0)
        # Iterations alternate between the modes, so drifting load on a shared machine hits every mode alike. The
        # optimizer state is allocated on a mode's first step, after its build: state_bytes is read after the run.
        for it in range(args.warmup + args.iters):
            for name, mode in list(modes.items()):
                try:
                    run_timed(mode, it, device, record=it >= args.warmup)
                except Exception as exc:
                    failed[name] = _failure(exc, f"iteration {it}", device)
                    if mode.cleanup:
                        mode.cleanup()
                    del modes[name], mode
                    gc.collect()
        for name, mode in modes.items():
            rows.append(summarise(name, mode, device))
            if mode.cleanup:
                mode.cleanup()
        del modes
        gc.collect()
    speedups: dict[str, Any] = {}
    by = {r["mode"]: r for r in rows}
    if "official" in by:
        base = by["official"]
        for r in rows:
            if r["mode"] == "official":
                continue
            speedups[r["mode"]] = {
                "iteration": base["seconds_per_iteration"] / r["seconds_per_iteration"],
                "iteration_min": base["seconds_per_iteration_min"] / r["seconds_per_iteration_min"],
                **{
                    k: (base["phases"][k] / r["phases"][k] if r["phases"][k] > 0 else None)
                    for k in ("sampling", "sampling_unet", "sampling_decode", "sampling_score", "training")
                },
                "peak_memory_ratio": (
                    r["peak_memory_bytes"] / base["peak_memory_bytes"]
                    if r["peak_memory_bytes"] and base["peak_memory_bytes"]
                    else None
                ),
                "state_memory_ratio": r["state_bytes"] / base["state_bytes"],
            }
    table = [
        {
            "mode": r["mode"],
            "s/iter": r["seconds_per_iteration"],
            **{k.replace("sampling_", "samp."): v for k, v in r["phases"].items()},
            "pairs": r["pairs_per_iteration"][0],
            "img/s": r["images_per_second"],
            "peak MiB": r["peak_memory_bytes"] / 2**20 if r["peak_memory_bytes"] is not None else None,
            "state MiB": r["state_bytes"] / 2**20,
            "mfu": r["mfu"],
        }
        for r in rows
    ]
    if table:
        print_table(table, list(table[0]))
    for mode, sp in speedups.items():
        print(f"{mode} vs official: " + "  ".join(f"{k} {v:.2f}x" for k, v in sp.items() if v is not None))
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    payload = {"environment": environment(), "config": config, "modes": rows, "speedups": speedups}
    if failed:
        payload["failed_modes"] = failed
    path = write_json("bench_e2e", payload, args.out)
    for name, why in failed.items():
        print(f"{name} failed: {why}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    # A failed mode still writes the others' JSON, and makes the exit status say that something failed.
    result = main()
    sys.exit(0 if result and not result.get("failed_modes") else 1)
