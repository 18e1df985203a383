"""Multi-process training: the process group from the launcher's environment (torchrun, the deepspeed launcher,
SLURM scripts that export the same variables), cross-rank pair gathering, cross-rank agreement checks, DDP
wrapping, and DeepSpeed config handling.

The SPO iteration is ``sample -> gather -> shard -> train``: every rank samples its own prompts with its own random
streams, :meth:`DistributedContext.gather_pairs` gives every rank the union of all ranks' pairs (in rank order), the
ledger shuffles that union with the shared seed and every rank trains on its strided shard (the official semantics).
Nothing here imports the trainer; the trainer calls these functions and stays a single-process loop when
``world_size == 1``.

Why DDP wraps the whole UNet (and not a module of LoRA parameters): peft injects the adapters inside the UNet's
attention layers, so the only forward that uses them is the UNet's. DDP registers hooks only on parameters with
``requires_grad`` (the LoRA weights, or everything in full fine-tuning), so wrapping the UNet reduces exactly the
trainable gradients in DDP's buckets, overlapped with backward, with no unused-parameter search. The reference
forward (adapters disabled, under ``no_grad``) and sampling call the unwrapped UNet, so they never touch DDP's
reducer. ``init_sync=False`` skips DDP's start-up broadcast of the whole module (gigabytes of frozen SDXL weights
that every rank loads from the same files); only the trainable parameters are broadcast from rank 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedContext",
    "DistributedError",
    "init_distributed",
    "is_deepspeed_available",
    "require_deepspeed",
    "load_deepspeed_config",
    "gather_rows",
    "digest",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_INIT_TIMEOUT_S",
]

# Collectives wait at most this long: rank 0 alone evaluates and writes checkpoints while the others wait in the next
# collective, so it must cover the slowest rank-0-only phase (a full fine-tuning checkpoint), not just one step.
DEFAULT_TIMEOUT_S = 900.0
# Creating the process group waits this long for the master and the other ranks: a missing or unreachable master
# fails in two minutes with a message instead of torch's default 30 minutes of silence.
DEFAULT_INIT_TIMEOUT_S = 120.0
ENV_TIMEOUT = "SPO_FAST_DIST_TIMEOUT"
ENV_INIT_TIMEOUT = "SPO_FAST_DIST_INIT_TIMEOUT"


class DistributedError(ValueError):
    """A launch problem or a disagreement between ranks. Raised on every rank with the same message, so no rank is
    left waiting in a collective; a ValueError so that the CLI reports it like any other bad input (exit code 2)."""


def is_deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as e:
        raise DistributedError(
            f"--deepspeed needs the deepspeed package, which is not importable ({e}): "
            "pip install 'spo_fast[deepspeed]' (or pip install deepspeed), or train with torchrun (DDP) instead"
        ) from e
    return deepspeed


def _env_int(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError as e:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer") from e


def _env_seconds(name: str, default: float) -> float:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        s = float(v)
    except ValueError as e:
        raise DistributedError(f"environment variable {name}={v!r} is not a number of seconds") from e
    if not s > 0:
        raise DistributedError(f"{name} must be > 0 seconds, got {v}")
    return s


def _resolve_device(device: str, local_rank: int) -> torch.device:
    """``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` when CUDA is there (one GPU per process), else CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("train.device=cuda but torch.cuda.is_available() is False")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but this host has {torch.cuda.device_count()} visible GPU(s): "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device(device)


@dataclass
class DistributedContext:
    """Rank, world size and device of this process, and the collectives the trainer needs. With ``world_size == 1``
    every method is a cheap no-op, so the trainer has one code path."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_process_group(cls, device: str = "auto") -> DistributedContext:
        """Adopt a process group that the caller created (library use inside an existing torchrun script)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0) or 0
        return cls(rank, world, local_rank, _resolve_device(device, local_rank), dist.get_backend())

    # -- basic collectives ---------------------------------------------------------------------------------------

    def _comm_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank (one tiny all-reduce)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t)
        return int(t.item()) == 0

    def agree(self, error: str | None) -> None:
        """Every rank passes its own error message (or None); if any rank has one, all ranks raise the same
        :class:`DistributedError` naming the ranks, instead of one rank exiting and the others hanging."""
        if not self.enabled:
            if error:
                raise ValueError(error)
            return
        errors = self.all_gather_object(error)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if not bad:
            return
        if len({e for _, e in bad}) == 1:
            ranks = [r for r, _ in bad]
            raise DistributedError(f"{bad[0][1]} (on rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)})")
        raise DistributedError("; ".join(f"rank {r}: {e}" for r, e in bad))

    def check_same(self, what: str, value: str, hint: str = "") -> None:
        """Raise on every rank when ranks hold different ``value``s (hashes of configs, files, checkpoints)."""
        values = self.all_gather_object(value)
        if len(set(values)) <= 1:
            return
        differ = [r for r, v in enumerate(values) if v != values[0]]
        groups: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            groups.setdefault(v, []).append(r)
        detail = "; ".join(f"{_ranks(rs)}: {v}" for v, rs in groups.items())
        raise DistributedError(
            f"the {what} differs across ranks: rank{'s' if len(differ) > 1 else ''} {_ranks(differ)} "
            f"differ{'' if len(differ) > 1 else 's'} from rank 0 ({detail}){'. ' + hint if hint else ''}"
        )

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key mean over the ranks that report the key (logged metrics of equal-sized shards)."""
        if not self.enabled:
            return dict(values)
        out: dict[str, list[float]] = {}
        for d in self.all_gather_object(dict(values)):
            for k, v in d.items():
                out.setdefault(k, []).append(float(v))
        return {k: math.fsum(v) / len(v) for k, v in out.items()}

    # -- pairs ---------------------------------------------------------------------------------------------------

    def gather_pairs(self, pairs: Any, prompts: Sequence[str]) -> tuple[Any, list[str]]:
        """Every rank's :class:`~spo_fast.sampler.PoolPairs` and prompt lists, concatenated in rank order on every
        rank. ``prompt_index`` (a column of the rank's own prompt list) is shifted onto the joined prompt list."""
        if not self.enabled:
            return pairs, list(prompts)
        meta = self.all_gather_object((list(prompts), pairs.shared_parent))
        if len({shared for _, shared in meta}) > 1:
            raise DistributedError("ranks disagree on whether win and lose share a parent (sampling.inner_steps)")
        offsets = [0]
        for p, _ in meta:
            offsets.append(offsets[-1] + len(p))
        fields = {k: v for k, v in vars(pairs).items() if isinstance(v, Tensor)}
        gathered, counts = gather_rows(fields, self)
        rank_of_row = torch.repeat_interleave(torch.arange(self.world_size), torch.tensor(counts))
        shift = torch.tensor(offsets[:-1], dtype=gathered["prompt_index"].dtype)[rank_of_row]
        gathered["prompt_index"] = gathered["prompt_index"] + shift.to(gathered["prompt_index"].device)
        joined = type(pairs)(**{**vars(pairs), **gathered})
        return joined, [p for plist, _ in meta for p in plist]

    # -- parameters ----------------------------------------------------------------------------------------------

    def broadcast_parameters(self, params: Sequence[Tensor], src: int = 0) -> None:
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                buf = p.data if p.device.type == self._comm_device().type else p.data.to(self._comm_device())
                dist.broadcast(buf, src)
                if buf is not p.data:
                    p.data.copy_(buf)

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """DDP over ``module``'s trainable parameters (see the module docstring for why the whole UNet)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        trainable = [p for p in module.parameters() if p.requires_grad]
        self.broadcast_parameters(trainable)
        # The UNet has no buffers that training changes: no per-forward buffer broadcast (the keyword was renamed).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = (
            {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            init_sync=False,  # trainable weights were broadcast above; frozen ones come from the same files
            find_unused_parameters=False,
            gradient_as_bucket_view=True,  # grads live in the all-reduce buckets: no second copy
            **no_buffer_sync,
        )

    @contextmanager
    def maybe_no_sync(self, module: nn.Module | None, sync: bool) -> Iterator[None]:
        """Skip DDP's all-reduce on gradient-accumulation micro-steps; reduce on the last one. A module that is not
        DDP (one process, or None) gets no context."""
        from torch.nn.parallel import DistributedDataParallel

        ctx = module.no_sync() if (not sync and isinstance(module, DistributedDataParallel)) else nullcontext()
        with ctx:
            yield

    def close(self, barrier: bool = True) -> None:
        """Barrier, then destroy the group we created: a rank that tears gloo down while another still talks to it
        makes the other abort at exit (about one run in three on a 2-core machine). ``barrier=False`` after a failed
        collective, where waiting again would only add another timeout."""
        if not self.owns_group or not dist.is_initialized():
            return
        try:
            if barrier and self.world_size > 1:
                dist.barrier()
        except Exception as e:  # noqa: BLE001 - a dead peer must not turn a clean exit into a crash
            logger.warning("rank %d: barrier before shutdown failed (%s)", self.rank, e)
        dist.destroy_process_group()
        self.owns_group = False


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def gather_rows(tensors: dict[str, Tensor], ctx: DistributedContext) -> tuple[dict[str, Tensor], list[int]]:
    """All-gather tensors that share their first dimension ``n``, which may differ per rank.

    One all-gather of the counts, then every row of every tensor is packed into one byte row (any dtype, bitwise
    exact), padded to the largest count, all-gathered once, and trimmed. Returns the concatenation in rank order on
    every rank (on each tensor's original device) and the per-rank counts.
    """
    if not tensors:
        raise ValueError("gather_rows needs at least one tensor")
    ns = {t.shape[0] for t in tensors.values()}
    if len(ns) != 1:
        raise ValueError(f"tensors must share their first dimension, got {sorted(ns)}")
    n = ns.pop()
    if not ctx.enabled:
        return dict(tensors), [n]
    dev = ctx._comm_device()
    counts_t = torch.tensor([n], dtype=torch.int64, device=dev)
    all_counts = [torch.zeros_like(counts_t) for _ in range(ctx.world_size)]
    dist.all_gather(all_counts, counts_t)
    counts = [int(c.item()) for c in all_counts]
    layout = []
    cols = []
    for name, t in tensors.items():
        row = math.prod(t.shape[1:])
        b = t.detach().to(dev).contiguous().reshape(n, row).view(torch.uint8)  # [n, row * itemsize]
        layout.append((name, t.dtype, t.shape[1:], t.device, b.shape[1]))
        cols.append(b)
    packed = torch.cat(cols, dim=1)
    width, most = packed.shape[1], max(counts)
    padded = torch.zeros((most, width), dtype=torch.uint8, device=dev)
    padded[:n] = packed
    out = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    if most > 0:
        dist.all_gather(out, padded)
    joined = torch.cat([o[:c] for o, c in zip(out, counts)])
    result, col = {}, 0
    for name, dtype, shape, device, nbytes in layout:
        part = joined[:, col : col + nbytes].contiguous()
        col += nbytes
        if nbytes == 0 or part.shape[0] == 0:
            result[name] = torch.empty((part.shape[0], *shape), dtype=dtype, device=device)
        else:
            result[name] = part.view(dtype).reshape(part.shape[0], *shape).to(device)
    return result, counts


def init_distributed(
    device: str = "auto",
    backend: str | None = None,
    timeout_s: float | None = None,
    init_timeout_s: float | None = None,
    force_group: bool = False,
) -> DistributedContext:
    """Create the process group from ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (what
    torchrun and the deepspeed launcher export). Without ``WORLD_SIZE`` (or with 1) this is a single process and no
    group is created. NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.

    ``init_timeout_s`` bounds the rendezvous (env ``SPO_FAST_DIST_INIT_TIMEOUT``, default 120 s), ``timeout_s`` every
    later collective (env ``SPO_FAST_DIST_TIMEOUT``, default 900 s); a timeout raises :class:`DistributedError`.
    ``force_group=True`` creates a one-process group when there is no launcher (DeepSpeed needs a group).
    """
    timeout_s = timeout_s if timeout_s is not None else _env_seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    if init_timeout_s is None:
        init_timeout_s = _env_seconds(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S)
    if timeout_s <= 0 or init_timeout_s <= 0:
        raise DistributedError(f"distributed timeouts must be > 0 s, got {timeout_s} and {init_timeout_s}")
    if dist.is_available() and dist.is_initialized():
        ctx = DistributedContext.from_process_group(device)
        ctx.timeout_s = timeout_s
        return ctx
    world = _env_int("WORLD_SIZE", None)
    if world is None or world == 1:
        dev = _resolve_device(device, 0)
        if not force_group:
            return DistributedContext(device=dev, timeout_s=timeout_s)
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        # An in-memory store: one process needs no rendezvous, MASTER_ADDR or free port. DeepSpeed insists on the
        # launcher's variables even then: describe this process as rank 0 of 1.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        return DistributedContext(device=dev, backend=backend, timeout_s=timeout_s, owns_group=True)
    if world < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {world}")
    rank = _env_int("RANK", None)
    if rank is None or not 0 <= rank < world:
        raise DistributedError(
            f"WORLD_SIZE={world} needs RANK in [0, {world - 1}], got {os.environ.get('RANK')!r}: launch with torchrun "
            "(or export RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process)"
        )
    local_rank = _env_int("LOCAL_RANK", 0) or 0
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    dev = _resolve_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=init_timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
    except Exception as e:  # DistStoreError, RuntimeError, TimeoutError: all mean "no rendezvous"
        raise DistributedError(
            f"rank {rank}/{world}: could not create the {backend} process group through {where} within "
            f"{init_timeout_s:g} s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check that all "
            f"{world} processes were started (torchrun --nnodes/--nproc_per_node), that MASTER_ADDR is reachable from "
            f"this host and MASTER_PORT is open; allow more time with --dist-init-timeout or {ENV_INIT_TIMEOUT}"
        ) from e
    try:  # private API (torch >= 2.3): collectives get their own, longer limit than the rendezvous
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - an older torch keeps the rendezvous limit for collectives
        logger.warning("could not set the collective timeout (%s); collectives use %g s", e, init_timeout_s)
        timeout_s = init_timeout_s
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, dev, backend)
    return DistributedContext(rank, world, local_rank, dev, backend, timeout_s, owns_group=True)


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (ranks compare digests instead of whole configs or prompt lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_deepspeed_config(
    source: str | os.PathLike | dict[str, Any],
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float,
    lora: bool,
) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and reconcile it with spo_fast's settings.

    spo_fast owns the batch geometry, the optimizer (AdamW from ``train.*``) and the warm-up schedule:
    ``train_micro_batch_size_per_gpu`` = ``train.batch_size``, ``gradient_accumulation_steps`` = ``train.grad_accum``,
    ``train_batch_size`` = micro * accum * world size and ``gradient_clipping`` = ``train.max_grad_norm``. Missing or
    ``"auto"`` entries are filled in; contradicting ones are an error (not silently overridden).
    """
    if isinstance(source, dict):
        ds = json.loads(json.dumps(source))
        name = "the DeepSpeed config"
    else:
        p = Path(source)
        if not p.is_file():
            raise DistributedError(f"DeepSpeed config {p} does not exist")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DistributedError(f"DeepSpeed config {p} is not valid JSON: {e}") from e
        name = str(p)
    if not isinstance(ds, dict):
        raise DistributedError(f"{name} must hold a JSON object")
    expected = {
        "train_micro_batch_size_per_gpu": (micro_batch, "train.batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum"),
        "train_batch_size": (micro_batch * grad_accum * world_size, "train.batch_size * train.grad_accum * world size"),
        "gradient_clipping": (float(max_grad_norm), "train.max_grad_norm"),
    }
    errors = []
    for key, (want, source_name) in expected.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
        elif float(have) != float(want):
            errors.append(f"{key}={have} but {source_name} = {want}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            errors.append(
                f"remove the '{key}' section: spo_fast passes its own AdamW (train.lr, train.adam_betas, "
                "train.weight_decay, train.adam_eps) and warm-up schedule (train.warmup_steps)"
            )
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", False) not in (False, "auto"):
            errors.append(
                f"'{key}.enabled' is set: DeepSpeed would cast the whole UNet and loss-scale; use "
                "train.mixed_precision=bf16 (autocast, the same numerics as the DDP path) with weights in model.dtype"
            )
    stage = int(ds.get("zero_optimization", {}).get("stage", 0) or 0)
    if stage == 3 and lora:
        errors.append(
            "ZeRO-3 partitions the frozen base weights too, which LoRA training does not need: use ZeRO-1/2 "
            "(configs/deepspeed/zero2_lora.json) with LoRA and ZeRO-3 for full fine-tuning (model.lora_rank=0)"
        )
    if errors:
        raise DistributedError(f"{name} contradicts the spo_fast config: " + "; ".join(errors))
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)  # spo_fast logs its own metrics; silence DeepSpeed's step prints
    return ds
