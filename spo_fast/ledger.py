"""Resampler bookkeeping: per-step pair selection, the continuation draw, and the pair ledger of a sampling pass.

One sampling pass over ``b`` prompts scores a pool of ``k`` candidates per prompt at each step after the divert
step. For every scored step :func:`select_step` gives the win/lose pair of each prompt (the official
``preference_score_compare`` semantics of :func:`spo_fast.select_pairs`), its softmax margin, and the candidate
each prompt continues from (the step-wise resampler: uniform, independent of the scores). :class:`PairLedger`
records the steps of a pass, compacts the valid pairs at the end of the pass, keeps per-timestep statistics, and
turns the pairs into a deterministic per-epoch order split across ranks.

Two backends behind one API, bit-identical for the same inputs and seed:

- ``cpp``: ``spo_fast._C`` (``csrc/``), loaded by :mod:`spo_fast._cpp_lib`;
- ``python``: the pure-Python code below, line for line the same arithmetic.

``SPO_FAST_CPP=auto|1|0`` (or :func:`set_backend`, or the ``backend=`` argument) chooses; ``auto`` takes C++ when it
is built. CUDA scores always take the vectorised torch path (:func:`select_step_torch`) on the device, without a
host sync; ``backend="torch"`` forces that path on CPU too.

Randomness is counter-based (a splitmix64 hash of ``(seed, domain, counters...)``), so a draw depends only on its
key: never on threads, call order or how many draws came before, and a resumed run redraws the same values.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _cpp_lib
from .selection import check_threshold, pair_margin

__all__ = [
    "LEDGER_VERSION",
    "StepSelection",
    "PassPairs",
    "PairLedger",
    "continuation_indices",
    "select_step",
    "select_step_torch",
    "epoch_order",
    "shard_order",
    "set_backend",
    "active_backend",
]

# Format of PairLedger.state_dict(); bump on any change of its content or meaning.
LEDGER_VERSION = 1

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_DOMAIN_CONTINUATION = 1
_DOMAIN_PERMUTATION = 2
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Half-width of the band around the threshold inside which a margin is re-decided with torch's own arithmetic.
# torch's float32 softmax margin is within ~2.2 ulp (2**-24) of the exact value (measured over 1.6e7 pairs), its
# float64 one within ~2 ulp (2**-53); the bands leave a factor 64 of headroom. Other dtypes (half, bfloat16) are
# always re-decided: their margin is rounded too coarsely for any band to be safe.
_BAND = {torch.float32: 2.0**-18, torch.float64: 2.0**-47}


# --------------------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------------------


def set_backend(backend: str | None) -> None:
    """Process-wide backend: ``'cpp'`` (required), ``'python'``, ``'auto'``; ``None`` returns to ``SPO_FAST_CPP``."""
    mapping = {None: None, "auto": "auto", "cpp": "1", "python": "0"}
    if backend not in mapping:
        raise ValueError(f"backend must be one of 'cpp', 'python', 'auto' or None, got {backend!r}")
    _cpp_lib.set_cpp_mode(mapping[backend])


def _module(backend: str | None) -> Any:
    """The ``_C`` module to use, or ``None`` for the Python fallback."""
    if backend is None or backend == "auto":
        return _cpp_lib.get_cpp()
    if backend == "python":
        return None
    if backend == "cpp":
        if not _cpp_lib.cpp_available():
            raise RuntimeError(f"backend='cpp' but {_cpp_lib.cpp_unavailable_reason()}; {_cpp_lib.BUILD_HINT}")
        return _cpp_lib.cpp_module()
    raise ValueError(f"backend must be 'cpp', 'python', 'torch', 'auto' or None, got {backend!r}")


def active_backend(backend: str | None = None) -> str:
    """``'cpp'`` or ``'python'``: what a CPU call with this ``backend`` argument runs on."""
    return "cpp" if _module(backend) is not None else "python"


# --------------------------------------------------------------------------------------------------------------
# Counter-based RNG (mirrors csrc/ledger_core.h)
# --------------------------------------------------------------------------------------------------------------


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _absorb(h: int, x: int) -> int:
    return _mix64(h ^ _mix64((x + _GOLDEN) & _MASK))


def _key_root(seed: int, domain: int) -> int:
    return _absorb(_mix64((seed + _GOLDEN) & _MASK), domain)


def _uniform_below(h: int, n: int) -> int:
    return (h * n) >> 64


def _int64(name: str, value: Any) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {v}")
    return v


def _continuation_py(seed: int, pass_index: int, step: int, batch: int, k: int) -> list[int]:
    prefix = _absorb(_absorb(_key_root(seed, _DOMAIN_CONTINUATION), pass_index & _MASK), step & _MASK)
    return [_uniform_below(_absorb(prefix, c), k) for c in range(batch)]


def continuation_indices(
    seed: int, pass_index: int, step: int, batch: int, k: int, *, backend: str | None = None
) -> Tensor:
    """Candidate each prompt continues from: ``[batch]`` int64, uniform in ``[0, k)``, on the CPU.

    Keyed by ``(seed, pass_index, step, column)`` only, hence independent of the scores (a CUDA caller computes it on
    the host without waiting for the device) and reproducible on resume.
    """
    seed, pass_index, step = _int64("seed", seed), _int64("pass_index", pass_index), _int64("step", step)
    batch, k = _int64("batch", batch), _int64("k", k)
    if k < 1 or batch < 0:
        raise ValueError(f"continuation_indices needs k >= 1 and batch >= 0, got k={k}, batch={batch}")
    mod = _module(backend)
    if mod is not None:
        return torch.from_numpy(mod.continuation_indices(seed, pass_index, step, batch, k))
    return torch.tensor(_continuation_py(seed, pass_index, step, batch, k), dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StepSelection:
    """Outcome of one scored step for ``b`` prompts; all tensors ``[b]`` on one device.

    ``win``/``lose``: candidate rows of the pair; ``valid``: margin above the threshold (never for a prompt with
    fewer than two finite scores); ``margin``: float32 softmax margin of (win, lose), NaN with fewer than two finite
    scores; ``next_index``: the candidate each prompt continues from.
    """

    win: Tensor
    lose: Tensor
    valid: Tensor
    margin: Tensor
    next_index: Tensor


def _check_scores(scores: Tensor, threshold: float) -> tuple[int, int]:
    check_threshold(threshold)
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a tensor of shape [k, b] (candidates x prompts), got {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    k, b = scores.shape
    if k < 2:
        raise ValueError(f"a pool needs k >= 2 candidates to form a pair, got k={k}")
    if b == 0:
        raise ValueError("scores has an empty batch (b = 0)")
    return k, b


@functools.lru_cache(maxsize=64)
def _threshold_in(threshold: float, dtype: torch.dtype) -> float:
    # select_pairs compares `margin > threshold` with the Python float cast to the margin's dtype (torch's scalar
    # promotion): 0.3 is compared as float32(0.3) = 0.30000001192... for float32 scores.
    return float(torch.tensor(threshold, dtype=dtype))


def _select_columns_py(
    rows: list[list[float]], k: int, b: int, threshold: float, band: float
) -> tuple[list[int], list[int], list[bool], list[float], list[bool], int]:
    """Mirror of ``select_columns`` in csrc/ledger_core.cpp: same comparisons, same double arithmetic."""
    win, lose, valid, margin, undecided = [0] * b, [0] * b, [False] * b, [math.nan] * b, [False] * b
    num_undecided = 0
    for c in range(b):
        w = lo = -1
        finite = 0
        best = worst = 0.0
        for r in range(k):
            v = rows[r][c]
            if not math.isfinite(v):
                continue
            finite += 1
            if w < 0 or v > best:
                best, w = v, r
            if lo < 0 or v <= worst:
                worst, lo = v, r
        if finite < 2:
            win[c], lose[c] = (0, k - 1) if finite == 0 else (w, lo)
            continue
        win[c], lose[c] = w, lo
        m = math.tanh((best - worst) * 0.5)
        margin[c] = m
        if abs(m - threshold) <= band:
            undecided[c] = True
            num_undecided += 1
        else:
            valid[c] = m > threshold
    return win, lose, valid, margin, undecided, num_undecided


def _decide_undecided(
    scores: Tensor, threshold: float, win: Tensor, lose: Tensor, valid: Tensor, margin: Tensor, undecided: Tensor
) -> None:
    """Re-decides the near-threshold columns with exactly select_pairs' arithmetic (in place).

    The margin is evaluated over the whole batch, as select_pairs does: torch's vectorised softmax may round a
    column differently depending on where in the vector it sits.
    """
    m = pair_margin(scores.gather(0, win[None])[0], scores.gather(0, lose[None])[0])
    valid[undecided] = (m > threshold)[undecided]
    margin[undecided] = m[undecided].float()


def select_step(
    scores: Tensor, threshold: float, seed: int, pass_index: int, step: int, *, backend: str | None = None
) -> StepSelection:
    """Pair selection and continuation draw for one scored step.

    Args:
        scores: ``[k, b]`` preference scores (k candidates for each of b prompts), floating point.
        threshold: a pair is valid when its softmax margin exceeds it; in ``[0, 1)``.
        seed, pass_index, step: key of the continuation draw (see :func:`continuation_indices`).
        backend: ``None``/``'auto'``, ``'cpp'``, ``'python'`` or ``'torch'`` (CUDA scores always use ``'torch'``).

    Returns:
        :class:`StepSelection` on the scores' device. ``win``/``lose``/``valid`` equal :func:`spo_fast.select_pairs`.
    """
    k, b = _check_scores(scores, threshold)
    seed, pass_index, step = _int64("seed", seed), _int64("pass_index", pass_index), _int64("step", step)
    if backend == "torch" or scores.device.type != "cpu":
        return select_step_torch(scores, threshold, seed, pass_index, step)
    mod = _module(backend)
    if scores.requires_grad:
        scores = scores.detach()
    dtype = scores.dtype
    band = _BAND.get(dtype, math.inf)
    thr = _threshold_in(float(threshold), dtype)
    # half/bfloat16 -> float32 is exact, so the argmax/argmin are unchanged; their margins are all re-decided below.
    x = (scores if scores.is_contiguous() else scores.contiguous()) if dtype in _BAND else scores.float()
    if mod is not None:
        fn = mod.select_step_f64 if x.dtype == torch.float64 else mod.select_step_f32
        w, lo, v, m, nxt, und, n_und = fn(x.numpy(), thr, band, seed, pass_index, step)
        win, lose, valid, margin = torch.from_numpy(w), torch.from_numpy(lo), torch.from_numpy(v), torch.from_numpy(m)
        next_index = torch.from_numpy(nxt)
        undecided = torch.from_numpy(und) if n_und else None
    else:
        w, lo, v, m, und, n_und = _select_columns_py(x.tolist(), k, b, thr, band)
        win, lose = torch.tensor(w, dtype=torch.int64), torch.tensor(lo, dtype=torch.int64)
        valid, margin = torch.tensor(v, dtype=torch.bool), torch.tensor(m, dtype=torch.float32)
        next_index = torch.tensor(_continuation_py(seed, pass_index, step, b, k), dtype=torch.int64)
        undecided = torch.tensor(und, dtype=torch.bool) if n_und else None
    if undecided is not None:
        _decide_undecided(scores, threshold, win, lose, valid, margin, undecided)
    return StepSelection(win=win, lose=lose, valid=valid, margin=margin, next_index=next_index)


def select_step_torch(scores: Tensor, threshold: float, seed: int, pass_index: int, step: int) -> StepSelection:
    """Vectorised torch-op selection (the CUDA path; usable on CPU). No host sync: the continuation indices are drawn
    on the host from the counter RNG and copied asynchronously.

    ``win``/``lose``/``valid`` equal :func:`spo_fast.select_pairs` on the same device (argmax/argmin return the
    first extreme, which is the stable-sort tie rule; the margin is computed by the same ``pair_margin``). The margin
    itself is torch's float32 softmax value, within a few ulps of the C++/Python backends' value.
    """
    k, b = _check_scores(scores, threshold)
    scores = scores.detach()
    finite = torch.isfinite(scores)
    win = torch.where(finite, scores, -math.inf).argmax(0)
    # The loser is the *last* of the worst: the first argmin of the rows in reverse order.
    lose = (k - 1) - torch.where(finite, scores, math.inf).flip(0).argmin(0)
    m = pair_margin(scores.gather(0, win[None])[0], scores.gather(0, lose[None])[0])
    enough = finite.sum(0) >= 2
    valid = enough & (m > threshold)
    margin = torch.where(enough, m, math.nan).float()
    next_index = continuation_indices(seed, pass_index, step, b, k)
    return StepSelection(win, lose, valid, margin, next_index.to(scores.device, non_blocking=True))


# --------------------------------------------------------------------------------------------------------------
# Permutation and sharding
# --------------------------------------------------------------------------------------------------------------


def _epoch_order_py(seed: int, epoch: int, n: int) -> list[int]:
    out = list(range(n))
    prefix = _absorb(_key_root(seed, _DOMAIN_PERMUTATION), epoch & _MASK)
    for i in range(n - 1, 0, -1):
        j = _uniform_below(_absorb(prefix, i), i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def epoch_order(seed: int, epoch: int, num_pairs: int, *, backend: str | None = None) -> Tensor:
    """Permutation of ``range(num_pairs)`` by Fisher-Yates driven by the counter RNG keyed by ``(seed, epoch)``."""
    seed, epoch, n = _int64("seed", seed), _int64("epoch", epoch), _int64("num_pairs", num_pairs)
    if n < 0:
        raise ValueError(f"num_pairs must be >= 0, got {n}")
    mod = _module(backend)
    if mod is not None:
        return torch.from_numpy(mod.epoch_order(seed, epoch, n))
    return torch.tensor(_epoch_order_py(seed, epoch, n), dtype=torch.int64)


def shard_order(
    order: Tensor, rank: int, world_size: int, drop_remainder: bool = True, *, backend: str | None = None
) -> Tensor:
    """This rank's part of ``order``, split like ``torch.utils.data.DistributedSampler`` (strided).

    ``drop_remainder=True`` keeps the first ``n - n % world_size`` entries (the official behaviour); ``False`` pads
    ``order`` by wrapping around from its start up to a multiple of ``world_size``. Rank ``r`` then takes entries
    ``r, r + world_size, r + 2 * world_size, ...``: every rank gets the same count and, without padding, every entry
    goes to exactly one rank.
    """
    rank, world_size = _int64("rank", rank), _int64("world_size", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not isinstance(order, Tensor) or order.ndim != 1:
        raise ValueError("order must be a 1-d tensor of pair indices")
    order = order.detach().to(device="cpu", dtype=torch.int64).contiguous()
    mod = _module(backend)
    if mod is not None:
        return torch.from_numpy(mod.shard(order.numpy(), rank, world_size, bool(drop_remainder)))
    n = order.numel()
    if n == 0:
        return order.new_empty(0)
    per_rank = n // world_size if drop_remainder else -(-n // world_size)
    idx = [(rank + i * world_size) % n for i in range(per_rank)]
    return order[torch.tensor(idx, dtype=torch.int64)]


# --------------------------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PassPairs:
    """The valid pairs of one pass, in (step, column) order; CPU tensors ``[num_pairs]``.

    ``step_slot`` is the 0-based index of the ``record_step`` call within the pass (it indexes the sampler's
    per-step buffers); ``column`` the prompt column; ``win``/``lose`` the candidate rows; ``parent`` the candidate the
    step's pool was drawn from (``-1`` at the divert step). ``num_invalid`` counts all prompt-steps without a valid
    pair, ``num_nan_prompts`` those of them with fewer than two finite scores.
    """

    pass_index: int
    step_slot: Tensor
    column: Tensor
    win: Tensor
    lose: Tensor
    timestep: Tensor
    prompt_id: Tensor
    parent: Tensor
    margin: Tensor
    num_invalid: int
    num_nan_prompts: int

    @property
    def num_pairs(self) -> int:
        return int(self.step_slot.numel())


class _PyLedgerCore:
    """Mirror of ``LedgerCore`` in csrc/ledger_core.cpp (same storage layout, same accumulation order)."""

    def __init__(self) -> None:
        self.stats_acc: dict[int, list] = {}
        self._reset(False, -1, [])

    def _reset(self, in_pass: bool, pass_index: int, prompt_ids: list[int]) -> None:
        self.in_pass, self.pass_index, self.prompt_ids, self.batch = in_pass, pass_index, prompt_ids, len(prompt_ids)
        self.steps: list[int] = []
        self.timesteps: list[int] = []
        self.win: list[int] = []
        self.lose: list[int] = []
        self.parent: list[int] = []
        self.valid: list[bool] = []
        self.margin: list[float] = []

    def begin_pass(self, pass_index: int, prompt_ids: np.ndarray) -> None:
        self._reset(True, pass_index, prompt_ids.tolist())

    def record(self, step, timestep, win, lose, valid, margin, parent) -> None:  # noqa: ANN001 (numpy arrays)
        if not self.in_pass:
            raise ValueError("record_step called outside a pass (call begin_pass first)")
        if len(win) != self.batch:
            raise ValueError(f"record_step got {len(win)} columns, the pass has {self.batch} prompts")
        self.steps.append(step)
        self.timesteps.append(timestep)
        self.win += win.tolist()
        self.lose += lose.tolist()
        self.valid += valid.tolist()
        self.margin += margin.tolist()
        self.parent += parent.tolist()

    def select_and_record(
        self,
        scores: np.ndarray,
        threshold: float,
        band: float,
        seed: int,
        step: int,
        timestep: int,
        parent: np.ndarray,
    ) -> tuple:
        """Mirror of ``select_and_record`` in csrc/bindings.cpp: numpy in, numpy out, recorded unless undecided."""
        if not self.in_pass:
            raise ValueError("record_step called outside a pass (call begin_pass first)")
        k, b = scores.shape
        if b != self.batch:
            raise ValueError(f"record_step got {b} columns, the pass has {self.batch} prompts")
        w, lo, v, m, und, n_und = _select_columns_py(scores.tolist(), k, b, threshold, band)
        out = (
            np.asarray(w, dtype=np.int64),
            np.asarray(lo, dtype=np.int64),
            np.asarray(v, dtype=bool),
            np.asarray(m, dtype=np.float32),  # rounded as static_cast<float>: the recorded margin is the float32 one
            np.asarray(_continuation_py(seed, self.pass_index, step, b, k), dtype=np.int64),
            np.asarray(und, dtype=bool) if n_und else None,
        )
        if not n_und:
            self.record(step, timestep, *out[:4], parent)
        return out

    # One method for both dtypes: the scores become Python floats (doubles) either way, as in select_step.
    select_and_record_f32 = select_and_record_f64 = select_and_record

    def end_pass(self) -> tuple:
        if not self.in_pass:
            raise ValueError("end_pass called outside a pass (call begin_pass first)")
        out: tuple[list, ...] = ([], [], [], [], [], [], [], [])
        step_slot, column, win, lose, timestep, prompt_id, parent, margin = out
        num_invalid = num_nan = 0
        b = self.batch
        for s, t in enumerate(self.timesteps):
            st = self.stats_acc.setdefault(t, [0, 0, 0, 0.0])
            for c in range(b):
                i = s * b + c
                m = self.margin[i]
                is_nan = math.isnan(m)
                st[0] += 1
                st[2] += is_nan
                num_nan += is_nan
                if not self.valid[i]:
                    num_invalid += 1
                    continue
                st[1] += 1
                st[3] += m
                step_slot.append(s)
                column.append(c)
                win.append(self.win[i])
                lose.append(self.lose[i])
                timestep.append(t)
                prompt_id.append(self.prompt_ids[c])
                parent.append(self.parent[i])
                margin.append(m)
        self._reset(False, -1, [])
        ints = tuple(np.asarray(v, dtype=np.int64) for v in out[:7])
        return (*ints, np.asarray(margin, dtype=np.float32), num_invalid, num_nan)

    def stats(self) -> dict[int, tuple]:
        return {t: tuple(v) for t, v in sorted(self.stats_acc.items())}

    def set_stats(self, stats: dict) -> None:
        self.stats_acc = {int(t): [int(v[0]), int(v[1]), int(v[2]), float(v[3])] for t, v in stats.items()}

    def get_pass(self) -> dict | None:
        if not self.in_pass:
            return None
        return {
            "pass_index": self.pass_index,
            "prompt_ids": np.asarray(self.prompt_ids, dtype=np.int64),
            "steps": np.asarray(self.steps, dtype=np.int64),
            "timesteps": np.asarray(self.timesteps, dtype=np.int64),
            "win": np.asarray(self.win, dtype=np.int64),
            "lose": np.asarray(self.lose, dtype=np.int64),
            "parent": np.asarray(self.parent, dtype=np.int64),
            "valid": np.asarray(self.valid, dtype=bool),
            "margin": np.asarray(self.margin, dtype=np.float32),
        }

    def set_pass(self, state: dict | None) -> None:
        self._reset(False, -1, [])
        if state is None:
            return
        self.begin_pass(int(state["pass_index"]), state["prompt_ids"])
        b, steps = self.batch, state["steps"]
        n = len(steps) * b
        if len(state["timesteps"]) != len(steps) or any(
            len(state[key]) != n for key in ("win", "lose", "parent", "valid", "margin")
        ):
            raise ValueError("inconsistent in-progress pass in the ledger state")
        for s in range(len(steps)):
            sl = slice(s * b, (s + 1) * b)
            self.record(
                int(steps[s]),
                int(state["timesteps"][s]),
                *(state[key][sl] for key in ("win", "lose", "valid", "margin", "parent")),
            )


def _host(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    # Zero-copy in the common case (the right dtype already); the extension copies a strided view itself.
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().numpy() if t.requires_grad else t.numpy()


class PairLedger:
    """Records the scored steps of each sampling pass and hands out the valid pairs.

    Use: ``begin_pass`` -> ``record_step`` per scored step -> ``end_pass`` (the :class:`PassPairs`), then
    ``epoch_order`` + ``shard`` to split the pairs across ranks. CPU selections go straight into the backend's
    storage; CUDA selections stay on the device until ``end_pass`` (or ``state_dict``), which moves them to the host
    in one transfer.

    Args:
        seed: key of the epoch permutations.
        drop_remainder: how :meth:`shard` evens out ranks (see :func:`shard_order`).
        backend: ``None``/``'auto'``, ``'cpp'`` or ``'python'``; fixed for the ledger's lifetime.
    """

    def __init__(self, seed: int = 0, drop_remainder: bool = True, *, backend: str | None = None) -> None:
        self.seed = _int64("seed", seed)
        self.drop_remainder = bool(drop_remainder)
        self._mod = _module(backend)
        self.backend = "cpp" if self._mod is not None else "python"
        self._core = self._mod.LedgerCore() if self._mod is not None else _PyLedgerCore()
        self._pending: list[tuple[int, int, StepSelection, Tensor]] = []  # device-resident records, oldest first
        self._batch = 0
        self._slots = 0  # record_step calls in the current pass
        self._in_pass = False
        self._pass_index = -1

    # -- one pass ------------------------------------------------------------------------------------------------

    def begin_pass(self, pass_index: int, prompt_ids: Sequence[int] | Tensor) -> None:
        """Starts pass ``pass_index`` over the prompts ``prompt_ids`` (``b`` ids, column order). Discards an unfinished
        pass."""
        pass_index = _int64("pass_index", pass_index)
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64, device="cpu").reshape(-1)
        if ids.numel() == 0:
            raise ValueError("begin_pass needs at least one prompt (empty batch)")
        self._pending.clear()
        self._core.begin_pass(pass_index, ids.contiguous().numpy())
        self._batch, self._slots, self._in_pass, self._pass_index = ids.numel(), 0, True, pass_index

    def record_step(self, step: int, timestep: int, selection: StepSelection, parent: Tensor) -> None:
        """Records one scored step; ``parent[b]``: the continuation index of the previous scored step (-1 at the
        divert step). Tensors may be on CUDA: they are kept there until :meth:`end_pass`."""
        if not self._in_pass:
            raise ValueError("record_step called outside a pass (call begin_pass first)")
        step, timestep = _int64("step", step), _int64("timestep", timestep)
        if not isinstance(parent, Tensor):
            parent = torch.as_tensor(parent, dtype=torch.int64, device=selection.win.device)
        b = self._batch
        for name, t in (("win", selection.win), ("lose", selection.lose), ("valid", selection.valid)):
            if t.shape != (b,):
                raise ValueError(f"selection.{name} has shape {tuple(t.shape)}, the pass has {b} prompts")
        if selection.margin.shape != (b,) or parent.shape != (b,):
            raise ValueError(f"margin and parent must have shape ({b},)")
        self._slots += 1
        if selection.win.device.type != "cpu" or self._pending:
            self._pending.append((step, timestep, selection, parent))
            return
        self._core.record(
            step,
            timestep,
            _host(selection.win, torch.int64),
            _host(selection.lose, torch.int64),
            _host(selection.valid, torch.bool),
            _host(selection.margin, torch.float32),
            _host(parent, torch.int64),
        )

    def select_and_record(
        self,
        step: int,
        timestep: int,
        scores: Tensor,
        threshold: float,
        parent: Tensor,
        *,
        seed: int | None = None,
        backend: str | None = None,
    ) -> StepSelection:
        """:func:`select_step` and :meth:`record_step` in one call: what the sampler runs at every scored step.

        The result equals ``select_step(scores, threshold, seed, pass_index, step)`` followed by
        ``record_step(step, timestep, selection, parent)`` with this pass's ``pass_index``, bit for bit, on every
        backend. On the CPU fast path (float32/float64 scores) the selection, the continuation draw and the append
        happen in one call into the backend's core: per step the Python side only checks the arguments and wraps the
        five result arrays as tensors (the separate calls cost about twice as much; see bench/bench_resampler.py).

        Args:
            step, timestep: as for :meth:`record_step`.
            scores: ``[k, b]`` preference scores of this pass's ``b`` prompts.
            threshold: validity threshold of the softmax margin, in ``[0, 1)``.
            parent: ``[b]`` continuation index of the previous scored step (``-1`` at the divert step).
            seed: key of the continuation draw; defaults to the ledger's ``seed``.
            backend: selection backend override, as for :func:`select_step` (``'torch'`` forces the torch-op path;
                CUDA scores always take it); ``None`` uses the ledger's backend.

        Returns:
            The :class:`StepSelection` (on the scores' device).
        """
        if not self._in_pass:
            raise ValueError("record_step called outside a pass (call begin_pass first)")
        k, b = _check_scores(scores, threshold)
        seed = self.seed if seed is None else _int64("seed", seed)
        step, timestep = _int64("step", step), _int64("timestep", timestep)
        if b != self._batch:
            raise ValueError(f"scores has {b} columns (prompts), the pass has {self._batch} prompts")
        if not isinstance(parent, Tensor):
            parent = torch.as_tensor(parent, dtype=torch.int64, device=scores.device)
        if parent.shape != (b,):
            raise ValueError(f"parent must have shape ({b},), got {tuple(parent.shape)}")
        dtype = scores.dtype
        if (
            (backend is not None and backend != self.backend and backend != "auto")
            or not scores.is_cpu
            or dtype not in _BAND
            or self._pending
        ):
            # Off the fast path (torch ops, CUDA, half precision, another backend, records waiting on the device): the
            # two public calls, which give the same result.
            sel = select_step(scores, threshold, seed, self._pass_index, step, backend=backend or self.backend)
            self.record_step(step, timestep, sel, parent)
            return sel
        x = scores.detach() if scores.requires_grad else scores
        if not x.is_contiguous():
            x = x.contiguous()
        p = _host(parent if parent.is_cpu else parent.cpu(), torch.int64)
        core = self._core
        fn = core.select_and_record_f64 if dtype is torch.float64 else core.select_and_record_f32
        w, lo, v, m, nxt, und = fn(
            x.numpy(), _threshold_in(float(threshold), dtype), _BAND[dtype], seed, step, timestep, p
        )
        win, lose, valid, margin = torch.from_numpy(w), torch.from_numpy(lo), torch.from_numpy(v), torch.from_numpy(m)
        if und is not None:
            # A margin within rounding of the threshold: decided with select_pairs' arithmetic, then recorded. The
            # tensors share memory with w, lo, v, m, so the record sees the decided values.
            _decide_undecided(x, threshold, win, lose, valid, margin, torch.from_numpy(und))
            core.record(step, timestep, w, lo, v, m, p)
        self._slots += 1
        return StepSelection(win=win, lose=lose, valid=valid, margin=margin, next_index=torch.from_numpy(nxt))

    def _flush(self) -> None:
        """Moves device-resident records to the host in one transfer (the pass's only host sync)."""
        if not self._pending:
            return
        pend, self._pending = self._pending, []
        # One device for the stack: the sampler's parent index can live on the host while the selection is on CUDA.
        dev = pend[0][2].win.device
        ints = torch.stack(
            [torch.stack([t.to(dev, torch.int64) for t in (s.win, s.lose, p, s.valid)]) for _, _, s, p in pend]
        ).cpu()  # [S, 4, b]
        margins = torch.stack([s.margin.to(dev, torch.float32) for _, _, s, _ in pend]).cpu()
        for i, (step, timestep, _, _) in enumerate(pend):
            w, lo, p, v = ints[i]
            self._core.record(step, timestep, w.numpy(), lo.numpy(), v.bool().numpy(), margins[i].numpy(), p.numpy())

    def end_pass(self) -> PassPairs:
        """Closes the pass and returns its valid pairs (also adds the pass to :meth:`stats`)."""
        if not self._in_pass:
            raise ValueError("end_pass called outside a pass (call begin_pass first)")
        self._flush()
        out = self._core.end_pass()
        self._in_pass, self._slots = False, 0
        tensors = [torch.from_numpy(a) for a in out[:8]]
        return PassPairs(self._pass_index, *tensors, num_invalid=int(out[8]), num_nan_prompts=int(out[9]))

    # -- epochs and ranks ----------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int, num_pairs: int) -> Tensor:
        """Deterministic permutation of ``range(num_pairs)`` keyed by ``(seed, epoch)``."""
        return epoch_order(self.seed, epoch, num_pairs, backend=self.backend)

    def shard(self, order: Tensor, rank: int, world_size: int) -> Tensor:
        """Rank ``rank``'s strided slice of ``order`` (see :func:`shard_order`; ``drop_remainder`` from the ledger)."""
        return shard_order(order, rank, world_size, self.drop_remainder, backend=self.backend)

    # -- statistics ----------------------------------------------------------------------------------------------

    def stats(self) -> dict[int, dict[str, float]]:
        """Per timestep over all finished passes: ``count`` (prompt-steps), ``num_valid``, ``valid_rate``,
        ``mean_margin`` (over valid pairs; NaN when none), ``nan_rate`` (prompts with < 2 finite scores)."""
        out: dict[int, dict[str, float]] = {}
        for t, (count, valid, nan, margin_sum) in self._core.stats().items():
            out[int(t)] = {
                "count": float(count),
                "num_valid": float(valid),
                "valid_rate": valid / count if count else math.nan,
                "mean_margin": margin_sum / valid if valid else math.nan,
                "nan_rate": nan / count if count else math.nan,
            }
        return out

    # -- checkpointing -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Backend-independent state (CPU tensors and Python numbers): a resume mid-pass continues identically."""
        self._flush()
        state: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "seed": self.seed,
            "drop_remainder": self.drop_remainder,
            "stats": {int(t): [int(v[0]), int(v[1]), int(v[2]), float(v[3])] for t, v in self._core.stats().items()},
            "pass": None,
        }
        current = self._core.get_pass()
        if current is not None:
            b = len(current["prompt_ids"])
            p = {"pass_index": int(current["pass_index"])}
            for key in ("prompt_ids", "steps", "timesteps"):
                p[key] = torch.from_numpy(np.array(current[key], dtype=np.int64))
            for key, dt in (("win", np.int64), ("lose", np.int64), ("parent", np.int64), ("valid", bool)):
                p[key] = torch.from_numpy(np.array(current[key], dtype=dt)).reshape(-1, b)
            p["margin"] = torch.from_numpy(np.array(current["margin"], dtype=np.float32)).reshape(-1, b)
            state["pass"] = p
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (from either backend).

        Raises:
            ValueError: the state comes from another ``LEDGER_VERSION`` or is malformed.
        """
        version = state.get("version") if isinstance(state, dict) else None
        if version != LEDGER_VERSION:
            raise ValueError(
                f"PairLedger state_dict has version {version!r}, this spo_fast reads LEDGER_VERSION={LEDGER_VERSION}"
            )
        try:
            seed, drop, stats, p = (
                _int64("seed", state["seed"]),
                bool(state["drop_remainder"]),
                state["stats"],
                state["pass"],
            )
        except KeyError as exc:
            raise ValueError(f"PairLedger state_dict lacks {exc}") from None
        self._pending.clear()
        self.seed, self.drop_remainder = seed, drop
        self._core.set_stats({int(t): (int(v[0]), int(v[1]), int(v[2]), float(v[3])) for t, v in stats.items()})
        if p is None:
            self._core.set_pass(None)
            self._in_pass, self._batch, self._slots = False, 0, 0
            return
        host = {"pass_index": int(p["pass_index"])}
        for key, dt in (("prompt_ids", torch.int64), ("steps", torch.int64), ("timesteps", torch.int64)):
            host[key] = _host(torch.as_tensor(p[key]), dt).reshape(-1)
        for key, dt in (("win", torch.int64), ("lose", torch.int64), ("parent", torch.int64), ("valid", torch.bool)):
            host[key] = _host(torch.as_tensor(p[key]), dt).reshape(-1)
        host["margin"] = _host(torch.as_tensor(p["margin"]), torch.float32).reshape(-1)
        try:
            self._core.set_pass(host)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(str(exc)) from None
        self._in_pass, self._batch, self._slots = True, len(host["prompt_ids"]), len(host["steps"])
        self._pass_index = host["pass_index"]
