"""The SPO pool sampler with the step-wise resampler (DESIGN.md section 2), batched over prompts and candidates.

One pass over a batch of b prompts:

* steps ``i < divert_step``: one stochastic DDIM trajectory per prompt;
* at ``divert_step`` the chain branches: k candidates from the same mean (independent noise);
* each candidate follows its own chain for ``inner_steps`` more steps (0 for SD1.5, 3 in the SDXL recipe);
* the candidates' predicted x0 are scored at their timestep (the final x_0 at timestep 0); best and worst form a
  pair (valid when the softmax margin exceeds the threshold); a uniformly random candidate continues and
  branches again. The UNet output that predicted the continuation's x0 is reused for its next step, so every
  scored step costs one UNet evaluation of the k*b candidates, as in the official sampler.

With ``divert_step=0, inner_steps=num_steps-1`` a pass is trajectory-level: k full trajectories per prompt labelled
by the final image (the Diffusion-DPO / D3PO baseline, ``--method dpo``).

The sampler knows the model only through ``denoiser(latents, timesteps, cond) -> model_output`` (CFG inside), the
scheduler, and ``scorer(x0, timesteps, prompt_index) -> scores``; it never loops over prompts or candidates.

Head mode (``head=``, a noisy-latent preference head, :mod:`spo_fast.head`): each scored step scores the k*b noisy
candidates x_t directly with ``head(latents, timesteps, cond, prompt_index, parent_x0=) -> scores`` at their
timestep (``parent_x0 [b, C, h, w]``: the x0 estimate of the pool's parent, free from the UNet call that made the
pool's mean; the direction head reads it), selects with the same threshold rule, and runs the denoiser only on the
b continuations (no x0 prediction, no decode, no image scorer). Pairs, ledger records and the continuation draws
have the same form as in the teacher mode.

Verified head mode (``head=`` and ``scorer=`` with ``verify_head=True``): the head proposes, the teacher decides.
Per pool the head picks its best and worst candidate; only those two get the teacher's x0 estimate, decode and
score (2b rows instead of k*b; a continuation that is one of the pair reuses that UNet pass for its next step), and
the pair's order and validity are the teacher's. Why: a head that is only
partly aligned with the teacher's gradient (the toy world's direction head: cosine ~0.5) steers SPO along its own
errors when its labels are trusted (on the toy world the held-out score never rose above 4.11 from 4.10 in 40
iterations, against 4.67 with the teacher); with teacher-ordered pairs every update has a positive first-order
projection on the teacher's gradient whatever the head gets wrong, and the head only chooses which two candidates
are worth the teacher's time (4.10 -> 4.52 with 1.5x fewer UNet rows and half the teacher calls).

Timestep-gated head (``head=`` and ``scorer=`` with ``head_max_timestep=T``): scored steps whose timestep is above T
are scored by the teacher (x0 estimate, decode, image scorer, as without a head), the others by the head (plain,
verified or refreshing). Why: a noisy-latent head judges the noisiest pools worst (the toy world's direction head
orders 93% / 86% of the teacher's valid pairs at t <= 250 / 250 < t <= 500 but 78% above 500, where even the
teacher's own first-order gradient reaches only 85%), and those steps hold most of the valid pairs; gating there
trades part of the head's speed-up for the teacher's pairs where the head is weakest.

Label audit (``audit=True`` on a head-mode sampler with a scorer): every head-scored step also gets the teacher's
scores of all k*b candidates (x0 estimate, decode, image scorer, as without a head), stored in the log beside the
labels the pairs were made from; the pairs do not change. Why: a head's held-out agreement is measured on the base
model's pools, and the policy moves away from them (the toy world's head alone drifts from ~80% to 62-70% within a
dozen iterations); the audit measures the labels on the policy's own pools (:func:`spo_fast.head.audit_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ddim import ddim_coefficients, ddim_step, predict_x0_eps
from .ledger import PairLedger
from .selection import check_threshold

__all__ = ["PoolSamplerConfig", "PoolPairs", "PoolLog", "PoolResult", "PoolSampler", "ddim_sample"]

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]
LatentScorer = Callable[[Tensor, Tensor, Any, Tensor], Tensor]


@dataclass
class PoolSamplerConfig:
    num_steps: int = 20
    num_candidates: int = 4
    divert_step: int = 4
    inner_steps: int = 0
    threshold: float = 0.3
    eta: float = 1.0
    # x0 estimate handed to the scorer: 1 = the official one-step prediction; n > 1 = n deterministic DDIM jumps
    # from the candidate down to t = 0 (the first reuses the UNet output the pass computes anyway).
    lookahead_steps: int = 1

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates (k) must be >= 2 to form a win-lose pair, got {self.num_candidates}")
        if not 0 <= self.divert_step < self.num_steps:
            raise ValueError(
                f"divert_step must lie in [0, num_steps - 1] = [0, {self.num_steps - 1}], got {self.divert_step}"
            )
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if self.lookahead_steps < 1:
            raise ValueError(f"lookahead_steps must be >= 1 (1 = the official one-step x0), got {self.lookahead_steps}")
        check_threshold(self.threshold)
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be > 0 for SPO (the pool needs stochastic steps), got {self.eta}")


@dataclass
class PoolPairs:
    """Training transitions of the valid pairs. ``parent_lose`` is None when win and lose share their parent
    (``inner_steps == 0``), so the trainer runs one policy and one reference forward per pair."""

    parent_win: Tensor
    win: Tensor
    lose: Tensor
    timesteps: Tensor
    prompt_index: Tensor  # column in the pass's prompt batch
    step_index: Tensor  # denoising step index i of the transition
    margin: Tensor
    parent_lose: Tensor | None = None

    def __len__(self) -> int:
        return self.win.shape[0]

    @property
    def shared_parent(self) -> bool:
        return self.parent_lose is None

    def select(self, idx: Tensor) -> PoolPairs:
        f = {k: (v[idx] if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return PoolPairs(**f)

    def to(self, device: torch.device | str) -> PoolPairs:
        return PoolPairs(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()})

    @staticmethod
    def cat(items: list[PoolPairs]) -> PoolPairs:
        keys = PoolPairs.__dataclass_fields__
        shared = all(i.parent_lose is None for i in items)
        out = {}
        for k in keys:
            if k == "parent_lose":
                out[k] = (
                    None
                    if shared
                    else torch.cat([i.parent_lose if i.parent_lose is not None else i.parent_win for i in items])
                )
            else:
                out[k] = torch.cat([getattr(i, k) for i in items])
        return PoolPairs(**out)


@dataclass
class PoolLog:
    """Per scored step: score timestep, scores [k, b], valid/margin/win/lose/next [b]."""

    score_timesteps: list[int] = field(default_factory=list)
    transition_timesteps: list[list[int]] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)
    valid: list[Tensor] = field(default_factory=list)
    margin: list[Tensor] = field(default_factory=list)
    win: list[Tensor] = field(default_factory=list)
    lose: list[Tensor] = field(default_factory=list)
    next_index: list[Tensor] = field(default_factory=list)
    # Label audit: the teacher's scores [k, b] of each head-scored step (None for steps not audited).
    audit_scores: list[Tensor | None] = field(default_factory=list)
    audit_rows: int = 0  # UNet rows the audit cost (not in PoolResult.unet_rows: it is monitoring, not sampling)


@dataclass
class PoolResult:
    pairs: PoolPairs
    log: PoolLog
    final: Tensor  # [b, ...] the continued chain's x_0
    unet_rows: int  # latent rows through the UNet (CFG doubling counted by the denoiser's owner)
    num_invalid: int = 0


class PoolSampler:
    """Batched SPO pool sampling; see the module docstring."""

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: Any,
        scorer: Scorer | None,
        config: PoolSamplerConfig,
        head: LatentScorer | None = None,
        observer: Callable[[Tensor, int, Tensor, Tensor], None] | None = None,
        verify_head: bool = False,
        head_max_timestep: int | None = None,
    ) -> None:
        """``head``: score noisy candidates with a noisy-latent preference head instead of ``scorer`` (which may
        then be None); see the module docstring. ``observer(candidates [k, b, C, h, w], score_timestep, scores [k, b],
        parent_x0 [b, C, h, w])`` is called after every scored step (the head distillation records pools with it).
        ``verify_head``: the head proposes each pool's pair, the scorer orders and validates it (module docstring).
        ``head_max_timestep``: the head scores only steps at or below this timestep, the scorer the others (None:
        the head scores every step)."""
        config.validate()
        if scorer is None and head is None:
            raise ValueError("PoolSampler needs a scorer (decoded x0) or a head (noisy latents)")
        if verify_head and (scorer is None or head is None):
            raise ValueError("verify_head needs both a head (to propose pairs) and a scorer (to verify them)")
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.scorer = scorer
        self.head = head
        self.observer = observer
        self.verify_head = bool(verify_head)
        if head_max_timestep is not None and (head is None or scorer is None):
            raise ValueError(
                "head_max_timestep gates between a head and a scorer: the sampler needs both (got "
                f"head={'set' if head is not None else None}, scorer={'set' if scorer is not None else None})"
            )
        if head_max_timestep is not None and head_max_timestep < 0:
            raise ValueError(
                f"head_max_timestep must be >= 0 (0: the head scores only the final x_0), got {head_max_timestep}"
            )
        self.head_max_timestep = head_max_timestep
        # Label audit (module docstring): set by the owner for the passes it wants audited.
        self.audit = False
        self.config = config
        scheduler.set_timesteps(config.num_steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]

    def _coeffs(self, i: int, n: int, device: torch.device):
        return ddim_coefficients(
            self.scheduler, self.timesteps[i], self.config.eta, batch_size=n, device=device,
            num_inference_steps=self.config.num_steps,
        )  # fmt: skip

    def _t(self, i: int, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), self.timesteps[i], dtype=torch.long, device=device)

    @torch.no_grad()
    def sample(
        self,
        cond: Any,
        latents: Tensor,
        generator: torch.Generator | None = None,
        ledger: PairLedger | None = None,
        pass_index: int = 0,
        prompt_ids: Tensor | None = None,
        seed: int = 0,
    ) -> PoolResult:
        """Run one pass from initial noise ``latents [b, C, h, w]`` with text conditioning ``cond`` (indexable
        by prompt). The continuation draws come from the ledger's counter RNG keyed (seed, pass_index, step)."""
        cfg = self.config
        k, n_steps = cfg.num_candidates, cfg.num_steps
        b, dev = latents.shape[0], latents.device
        if b == 0:
            raise ValueError("the prompt batch is empty")
        ledger = ledger if ledger is not None else PairLedger(seed=seed)
        ledger.begin_pass(pass_index, prompt_ids if prompt_ids is not None else torch.arange(b))
        cols = torch.arange(b, device=dev)
        cond_k = cond[cols.repeat(k).cpu()] if k > 1 else cond  # candidate r*b + j belongs to prompt j
        rows = 0

        x = latents
        for i in range(cfg.divert_step):
            pred = self.denoiser(x, self._t(i, b, dev), cond)
            rows += b
            x = ddim_step(self._coeffs(i, b, dev), pred, x, generator=generator)
        pred_parent = self.denoiser(x, self._t(cfg.divert_step, b, dev), cond)
        rows += b

        log = PoolLog()
        segments: list[list[Tensor]] = []  # per scored step: states [m+2] of [k, b, ...]
        parent_choice = torch.full((b,), -1, dtype=torch.long)
        i = cfg.divert_step
        while i < n_steps:
            m = min(cfg.inner_steps, n_steps - 1 - i)
            states = [x.unsqueeze(0).expand(k, *x.shape)]
            cur = ddim_step(self._coeffs(i, b, dev), pred_parent, x, num_candidates=k, generator=generator)
            states.append(cur)
            for j in range(1, m + 1):
                flat = cur.reshape(k * b, *x.shape[1:])
                pred = self.denoiser(flat, self._t(i + j, k * b, dev), cond_k)
                rows += k * b
                cur = ddim_step(self._coeffs(i + j, k * b, dev), pred, flat, generator=generator).view_as(cur)
                states.append(cur)
            i_next = i + m + 1
            flat = cur.reshape(k * b, *x.shape[1:])
            score_t = self.timesteps[i_next] if i_next < n_steps else 0
            use_head = self.head is not None and (self.head_max_timestep is None or score_t <= self.head_max_timestep)
            if i_next < n_steps and not use_head:
                pred_all = self.denoiser(flat, self._t(i_next, k * b, dev), cond_k)
                rows += k * b
                x0, extra = self._lookahead_x0(flat, pred_all, score_t, cond_k)
                rows += extra
            else:
                # Head mode scores the noisy candidates at their own timestep; the final step scores x_0 at 0.
                pred_all, x0 = None, flat
            score_ts = torch.full((k * b,), score_t, dtype=torch.long, device=dev)
            parent_x0 = None
            if use_head or self.observer is not None:
                # The parent's x0 estimate: elementwise from the UNet output the pool's mean was made with.
                parent_x0 = predict_x0_eps(self._coeffs(i, b, dev), pred_parent, x)[0].to(x.dtype)
            verified = None
            if use_head:
                scores = self.head(flat, score_ts, cond, cols.repeat(k), parent_x0=parent_x0)
                if self.verify_head:
                    scores, extra, verified = self._verify(
                        cur, scores.reshape(k, b).float(), i_next, score_t, cond, cols
                    )
                    rows += extra
            else:
                scores = self.scorer(x0, score_ts, cols.repeat(k))
            scores = scores.reshape(k, b).float()
            audit = None
            if use_head and self.audit and self.scorer is not None:
                audit, extra = self._teacher_scores(flat, i_next, score_t, score_ts, cond_k, cols.repeat(k))
                audit = audit.reshape(k, b).float().cpu()
                log.audit_rows += extra
            log.audit_scores.append(audit)
            if self.observer is not None:
                self.observer(cur, score_t, scores, parent_x0)
            sel = ledger.select_and_record(i, self.timesteps[i], scores, cfg.threshold, parent_choice, seed=seed)
            nxt = sel.next_index.to(dev)
            x = cur[nxt, cols]
            if pred_all is not None:
                pred_parent = pred_all.view(k, b, *x.shape[1:])[nxt, cols]
            elif verified is not None and i_next < n_steps:
                pred_parent, extra = self._continuation_pred(x, nxt, verified, i_next, cond, cols)
                rows += extra
            elif i_next < n_steps:  # head mode: the UNet runs on the b continuations only
                pred_parent = self.denoiser(x, self._t(i_next, b, dev), cond)
                rows += b
            parent_choice = sel.next_index.cpu()
            segments.append(states)
            log.score_timesteps.append(score_t)
            log.transition_timesteps.append(self.timesteps[i : i + m + 1])
            for name in ("valid", "margin", "win", "lose", "next_index"):
                getattr(log, name).append(getattr(sel, name).cpu())
            log.scores.append(scores.cpu())
            i = i_next

        pp = ledger.end_pass()
        pairs = self._gather(pp, segments, log)
        return PoolResult(pairs, log, x, rows, int(pp.num_invalid))

    @torch.no_grad()
    def _teacher_scores(
        self, flat: Tensor, i_next: int, score_t: int, score_ts: Tensor, cond_k: Any, prompt_index: Tensor
    ) -> tuple[Tensor, int]:
        """The teacher's scores of the k*b candidates ``flat`` as the teacher mode computes them (label audit)."""
        if i_next >= self.config.num_steps:
            return self.scorer(flat, score_ts, prompt_index), 0  # the final step: the candidates are x_0
        pred = self.denoiser(flat, self._t(i_next, flat.shape[0], flat.device), cond_k)
        x0, extra = self._lookahead_x0(flat, pred, score_t, cond_k)
        return self.scorer(x0, score_ts, prompt_index), flat.shape[0] + extra

    def _verify(
        self, cur: Tensor, head_scores: Tensor, i_next: int, score_t: int, cond: Any, cols: Tensor
    ) -> tuple[Tensor, int]:
        """Verified head mode: the teacher's scores of the head's best and worst candidate of each pool, placed in a
        ``[k, b]`` score table whose other entries sit halfway between the two, so that the ledger's argmax/argmin
        select exactly the verified pair and its margin is the teacher's (a tie is an invalid pair). Returns the
        table and the UNet rows the teacher's x0 estimates cost."""
        k, b = head_scores.shape
        pair = torch.stack([head_scores.argmax(0), head_scores.argmin(0)])  # [2, b]
        two = cur[pair, cols].reshape(2 * b, *cur.shape[2:])
        cols2 = cols.repeat(2)
        rows, pred = 0, None
        if i_next < self.config.num_steps:
            cond2 = cond[cols2.cpu()]
            pred = self.denoiser(two, self._t(i_next, 2 * b, two.device), cond2)
            x0, extra = self._lookahead_x0(two, pred, score_t, cond2)
            rows = 2 * b + extra
            pred = pred.view(2, b, *pred.shape[1:])
        else:
            x0 = two  # the final step: the candidates are x_0
        ts = torch.full((2 * b,), score_t, dtype=torch.long, device=two.device)
        s2 = self.scorer(x0, ts, cols2).reshape(2, b).float()
        table = ((s2[0] + s2[1]) / 2).expand(k, b).clone()
        table.scatter_(0, pair[1:], s2[1:])
        table.scatter_(0, pair[:1], s2[:1])  # an argmax == argmin pool keeps one score: a tie, no pair
        return table, rows, (pair, pred)

    def _continuation_pred(
        self, x: Tensor, nxt: Tensor, verified: tuple[Tensor, Tensor | None], i_next: int, cond: Any, cols: Tensor
    ) -> tuple[Tensor, int]:
        """The continuations' UNet output for their next step: reused from the verified pair's x0 pass where the
        (uniformly drawn) continuation is one of the pair, as the teacher mode reuses its candidates' pass. On CPU
        only the others run; on CUDA all b rows run and the pair's rows are overwritten, so the graphed denoiser keeps
        its static shapes. Returns the output and the UNet rows it cost."""
        pair, pred2 = verified
        b = x.shape[0]
        hit = pair == nxt[None]  # [2, b]
        covered = hit.any(0)
        from_pair = pred2[hit.int().argmax(0), cols]  # the pair row equal to the continuation (any, where none)
        if x.device.type == "cuda" or not bool(covered.any()):
            out = self.denoiser(x, self._t(i_next, b, x.device), cond)
            return torch.where(covered.view(-1, *[1] * (x.ndim - 1)), from_pair, out), b
        out = from_pair.clone()
        miss = (~covered).nonzero()[:, 0]
        if len(miss):
            out[miss] = self.denoiser(x[miss], self._t(i_next, len(miss), x.device), cond[miss.cpu()])
        return out, len(miss)

    def _lookahead_x0(self, x: Tensor, pred: Tensor, t: int, cond: Any) -> tuple[Tensor, int]:
        """The candidates' x0 estimate for the scorer and the extra UNet rows it cost.

        A scorer that judges finished images (the toy world's analytic score, an aesthetic or PickScore model without
        timestep conditioning) is misled by the blurry one-step x0 at high noise, and SPO then learns to please the
        blur: on the toy world, one-step labels at divert step 4 lower the held-out score (4.10 -> 2.80 in 10
        iterations) while 3-jump lookahead labels raise it (4.10 -> 4.17), close to labels from the full 20-step
        rollout (4.24). The jumps are deterministic (eta = 0) and evenly spaced in t from the candidate's timestep
        to 0; the first reuses ``pred``."""
        n = self.config.lookahead_steps
        x0, eps = predict_x0_eps(self._coeffs_at(t, x.shape[0], x.device), pred, x)
        if n == 1:
            return x0, 0
        alphas = self.scheduler.alphas_cumprod
        seq = [round(t * (1 - j / n)) for j in range(n)]
        for t_next in seq[1:]:
            a = alphas[t_next].to(device=x.device, dtype=x.dtype)
            x = a.sqrt() * x0 + (1 - a).sqrt() * eps
            ts = torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device)
            x0, eps = predict_x0_eps(self._coeffs_at(t_next, x.shape[0], x.device), self.denoiser(x, ts, cond), x)
        return x0, (n - 1) * x.shape[0]

    def _coeffs_at(self, t: int, n: int, device: torch.device):
        return ddim_coefficients(
            self.scheduler, t, self.config.eta, batch_size=n, device=device, num_inference_steps=self.config.num_steps
        )

    def _gather(self, pp: Any, segments: list[list[Tensor]], log: PoolLog) -> PoolPairs:
        """Expand each valid (step, prompt) record into its m+1 transitions and gather the latents."""
        shared = all(len(s) == 2 for s in segments)
        parts: dict[str, list[Tensor]] = {k: [] for k in ("pw", "pl", "w", "l", "t", "p", "s", "m")}
        for slot in pp.step_slot.unique().tolist():
            sel = pp.step_slot == slot
            col, win, lose = pp.column[sel], pp.win[sel], pp.lose[sel]
            states = segments[slot]
            dev = states[0].device
            col_d, win_d, lose_d = col.to(dev), win.to(dev), lose.to(dev)
            for j, t in enumerate(log.transition_timesteps[slot]):
                parts["pw"].append(states[j][win_d, col_d])
                parts["pl"].append(states[j][lose_d, col_d])
                parts["w"].append(states[j + 1][win_d, col_d])
                parts["l"].append(states[j + 1][lose_d, col_d])
                parts["t"].append(torch.full_like(col, t))
                parts["p"].append(col)
                parts["s"].append(torch.full_like(col, self.timesteps.index(t)))
                parts["m"].append(pp.margin[sel].float())
        if not parts["w"]:
            shape = segments[0][0].shape[2:] if segments else (0,)
            dev = segments[0][0].device if segments else "cpu"
            empty = torch.empty(0, *shape, device=dev)
            e = torch.empty(0, dtype=torch.long)
            return PoolPairs(empty, empty, empty, e, e, e, torch.empty(0), None if shared else empty)
        return PoolPairs(
            parent_win=torch.cat(parts["pw"]),
            win=torch.cat(parts["w"]),
            lose=torch.cat(parts["l"]),
            timesteps=torch.cat(parts["t"]),
            prompt_index=torch.cat(parts["p"]),
            step_index=torch.cat(parts["s"]),
            margin=torch.cat(parts["m"]),
            parent_lose=None if shared else torch.cat(parts["pl"]),
        )


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    scheduler: Any,
    latents: Tensor,
    cond: Any,
    num_steps: int = 20,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Plain DDIM generation (no pools): returns the final latents x_0. eta = 0 is deterministic."""
    scheduler.set_timesteps(num_steps)
    x, b = latents, latents.shape[0]
    for t in scheduler.timesteps.tolist():
        ts = torch.full((b,), int(t), dtype=torch.long, device=x.device)
        pred = denoiser(x, ts, cond)
        c = ddim_coefficients(scheduler, ts, eta, batch_size=b, device=x.device, num_inference_steps=num_steps)
        x = ddim_step(c, pred, x, generator=generator) if eta > 0 else ddim_step(c, pred, x, noise=torch.zeros_like(x))
    return x
