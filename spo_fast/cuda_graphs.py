"""CUDA-graph replay of the sampler's denoiser: one captured graph per static input shape.

Pool sampling calls ``denoiser(latents, timesteps, cond)`` with two shapes only: ``b`` rows before the divert step
and ``k * b`` rows after it (CFG doubling happens inside the denoiser). Every call launches the whole UNet, several
hundred kernels; on a GPU at SD1.5 size the launch overhead and the Python in between are a visible share of the
sampling time. :class:`GraphedDenoiser` captures the denoiser once per input signature (shapes, dtypes, devices and
the non-tensor arguments) into a ``torch.cuda.CUDAGraph`` and afterwards only copies the inputs into fixed buffers
and replays the graph.

Contract and choices:

- Sampling only: under ``torch.is_grad_enabled()`` the wrapper calls the denoiser eagerly (training forwards need
  autograd, which a replayed graph does not record). :class:`spo_fast.PoolSampler.sample` runs under ``no_grad``.
- The DDIM update stays eager and draws its noise outside the graph from the caller's generator, so graphed and
  eager sampling give the same samples for the same generator (the replayed kernels are the captured ones).
- The first call of a signature warms the denoiser up on a side stream (cuDNN / cuBLAS workspace and algorithm
  choice happen there, not during capture), then captures. All graphs share one memory pool; each graph keeps its
  static output alive, so captures never overwrite each other's results.
- Python-side control flow is frozen at capture: toggling LoRA adapters, changing the attention processor or the
  guidance scale after a capture needs :meth:`GraphedDenoiser.reset`. Parameters updated in place (the optimizer
  step on LoRA weights) are read by the replay, because a graph reads its tensors' memory, not a copy.
- Any capture failure (a host sync inside the denoiser, an op that is not capturable) logs one line and that
  signature runs eagerly from then on; errors of the eager warm-up itself are real errors and propagate.
- Outputs are cloned by default: the next replay reuses the static output buffer, and the sampler keeps predictions
  across calls.

Use :func:`maybe_graph` to wrap: off on CPU, on by default on CUDA, ``SPO_FAST_CUDA_GRAPHS=0`` turns it off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphedDenoiser", "maybe_graph", "cuda_graphs_requested", "CUDA_GRAPHS_ENV"]

logger = logging.getLogger(__name__)

CUDA_GRAPHS_ENV = "SPO_FAST_CUDA_GRAPHS"


# ---------------------------------------------------------------------------------------------------- pytrees
# The conditioning is a PromptEmbeds dataclass (embeds / pooled / time_ids), a tensor, or None; flatten any nesting
# of dataclasses, tuples, lists and dicts into tensor leaves plus a hashable structure, so a signature is a dict key.


def _flatten(obj: Any, leaves: list[Tensor]) -> Hashable:
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return ("T", tuple(obj.shape), obj.dtype, obj.device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = tuple((f.name, _flatten(getattr(obj, f.name), leaves)) for f in dataclasses.fields(obj))
        return ("D", type(obj), fields)
    if isinstance(obj, (tuple, list)):
        return ("S", type(obj), tuple(_flatten(v, leaves) for v in obj))
    if isinstance(obj, dict):
        return ("M", tuple((k, _flatten(v, leaves)) for k, v in obj.items()))
    # Non-tensor arguments (None, flags such as return_halves, Python numbers) are part of the signature.
    return ("V", obj if isinstance(obj, Hashable) else id(obj))


def _unflatten(spec: Hashable, leaves: list[Tensor], pos: list[int]) -> Any:
    tag = spec[0]
    if tag == "T":
        pos[0] += 1
        return leaves[pos[0] - 1]
    if tag == "D":
        return spec[1](**{name: _unflatten(s, leaves, pos) for name, s in spec[2]})
    if tag == "S":
        return spec[1](_unflatten(s, leaves, pos) for s in spec[2])
    if tag == "M":
        return {k: _unflatten(s, leaves, pos) for k, s in spec[1]}
    return spec[1]


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    leaves: list[Tensor] = []
    spec = _flatten(obj, leaves)
    return _unflatten(spec, [fn(t) for t in leaves], [0])


# ---------------------------------------------------------------------------------------------------- capability


def cuda_graphs_requested(enabled: bool | None, device: torch.device | str | None) -> bool:
    """Whether graphs should be used: ``enabled`` (None = auto) combined with ``SPO_FAST_CUDA_GRAPHS`` and the
    device. Auto means on for CUDA devices, off otherwise; asking for graphs on a non-CUDA device logs once."""
    env = os.environ.get(CUDA_GRAPHS_ENV, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes") and enabled is None:
        enabled = True
    dev = torch.device(device) if device is not None else None
    on_cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
    if enabled and not on_cuda:
        _log_once(
            f"cpu-{dev}",
            logging.INFO,
            "CUDA graphs need a CUDA device (the sampler runs on %s): sampling runs eager",
            dev,
        )
        return False
    return on_cuda if enabled is None else bool(enabled)


_LOGGED: set[Hashable] = set()


def _log_once(key: Hashable, level: int, msg: str, *args: Any) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, msg, *args)


# ---------------------------------------------------------------------------------------------------- the wrapper


@dataclasses.dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_inputs: list[Tensor]
    static_output: Any


class GraphedDenoiser:
    """Wraps ``denoiser(*args, **kwargs)`` (tensors, PromptEmbeds-like dataclasses, tuples, flags) with CUDA graphs.

    Args:
        denoiser: the callable to capture, e.g. the trainer's autocast-wrapped CFG denoiser.
        enabled: None = on for CUDA inputs; False = always eager (a pass-through).
        warmup: eager calls on a side stream before a capture.
        max_graphs: signatures captured at most; further signatures run eagerly (pool sampling needs two, plus one
            per evaluation batch size).
        clone_outputs: return copies of the static outputs (safe default); False returns the static buffers,
            which the next replay of the same signature overwrites.

    ``stats`` counts ``captures``, ``replays``, ``eager`` calls and ``failures``.
    """

    def __init__(
        self,
        denoiser: Callable[..., Any],
        enabled: bool | None = None,
        warmup: int = 2,
        max_graphs: int = 8,
        clone_outputs: bool = True,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first eager run must not happen during capture), got {warmup}")
        self.denoiser = denoiser
        self.enabled = enabled
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.clone_outputs = clone_outputs
        self._graphs: dict[Hashable, _Graph] = {}
        self._failed: set[Hashable] = set()
        self._pool: Any = None
        self.stats = {"captures": 0, "replays": 0, "eager": 0, "failures": 0}

    def __getattr__(self, name: str) -> Any:
        # Attribute access falls through to the wrapped denoiser (e.g. .unet, .guidance_scale, .unet_forward).
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def reset(self) -> None:
        """Drops every captured graph (call after changing the denoiser's Python-side behaviour)."""
        self._graphs.clear()
        self._failed.clear()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        self.stats["eager"] += 1
        return self.denoiser(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves: list[Tensor] = []
        spec = _flatten((args, kwargs), leaves)
        if (
            self.enabled is False
            or torch.is_grad_enabled()
            or not leaves
            or not all(t.is_cuda for t in leaves)
            or torch.cuda.is_current_stream_capturing()
        ):
            return self._eager(args, kwargs)
        entry = self._graphs.get(spec)
        if entry is None:
            if spec in self._failed:
                return self._eager(args, kwargs)
            if len(self._graphs) >= self.max_graphs:
                _log_once(
                    ("max", id(self)), logging.INFO,
                    "CUDA graphs: %d input signatures captured (max_graphs); new ones run eager", self.max_graphs,
                )  # fmt: skip
                return self._eager(args, kwargs)
            entry = self._capture(spec, leaves)
            if entry is None:
                return self._eager(args, kwargs)
        for buf, t in zip(entry.static_inputs, leaves):
            buf.copy_(t, non_blocking=True)
        entry.graph.replay()
        self.stats["replays"] += 1
        if self.clone_outputs:
            return _map_tensors(entry.static_output, lambda t: t.clone())
        return entry.static_output

    def _capture(self, spec: Hashable, leaves: list[Tensor]) -> _Graph | None:
        # Fixed input buffers: allocated outside the graph pool, owned by the entry for its lifetime.
        static = [t.detach().clone() for t in leaves]
        s_args, s_kwargs = _unflatten(spec, static, [0])
        stream = torch.cuda.Stream(device=static[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.denoiser(*s_args, **s_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.denoiser(*s_args, **s_kwargs)
        except Exception as exc:  # noqa: BLE001 - any capture problem means: run this signature eagerly
            self._failed.add(spec)
            self.stats["failures"] += 1
            torch.cuda.synchronize()
            _log_once(
                ("fail", type(exc).__name__, str(exc)[:200]), logging.WARNING,
                "CUDA graph capture failed (%s: %s); this input shape runs eager",
                type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "",
            )  # fmt: skip
            return None
        entry = _Graph(graph, static, out)
        self._graphs[spec] = entry
        self.stats["captures"] += 1
        logger.debug("captured a CUDA graph for %d input tensors (%d graphs)", len(static), len(self._graphs))
        return entry


def maybe_graph(
    denoiser: Callable[..., Any], device: torch.device | str | None, enabled: bool | None = None, **kwargs: Any
) -> Callable[..., Any]:
    """``denoiser`` wrapped in a :class:`GraphedDenoiser` when graphs are wanted on ``device`` (see
    :func:`cuda_graphs_requested`), else ``denoiser`` itself. Idempotent: an already graphed denoiser is returned."""
    if isinstance(denoiser, GraphedDenoiser):
        return denoiser
    if not cuda_graphs_requested(enabled, device):
        return denoiser
    return GraphedDenoiser(denoiser, enabled=True, **kwargs)
