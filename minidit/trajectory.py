"""Personalize Anything's reference branch of `sampling.denoise`: the references re-trace their own images in front
of the targets, and a `RefState` per step says what the targets take from them (personalize.py's docstring follows
one token through it; the settings `s` are a personalize.PersonalizeSettings or EditSettings)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from . import sampling
from .presets import Settings
from .refcache import Entry
from .refstate import RefState
from .regions import Region, copy_tokens


class ReferenceTrajectory:
    """The reference branch of `sampling.denoise`: the references' own trajectories in front of the targets.

    x_ref (n, N, 64) the references' inverted latents, y0 (n, N, 64) their clean latents, ids (n, N, 3) and
    txt / txt_ids / vec (n, ...) their positions and prompts; regions: one per reference (empty: no
    replacement, e.g. `reconstruct`). Steps i < n_replace replace tokens (RefState.replace); later steps share
    the reference tokens as keys/values when `s.concat` (with concat_steps="all" at every step and for every
    item, references included). `blend` sets the targets' latents in the regions to the references' at the
    replacement steps and once after the last one (editing). η acts on steps [start·n, stop·n). The references
    leave the batch once nothing reads them (unless `keep`). `trace` (tests): one dict per step (step, t, n_ref,
    replace, share, x = the step's input latents [references; targets], layers = RefState's records).
    `kept` (a refcache.Entry): the references run in a pass of their own before the targets' at every step, and
    each step's rows and latents are kept there; a step already kept is read instead of run."""

    def __init__(self, x_ref: Tensor, y0: Tensor, ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor,
                 regions: list[Region], steps: int, s: Settings, *, n_replace: int, blend: bool = False,
                 keep: bool = False, trace: list | None = None, kept: Entry | None = None):
        self.n = n = x_ref.shape[0]
        self.x, self.y0, self.ids, self.txt, self.txt_ids, self.vec = x_ref, y0.float(), ids, txt, txt_ids, vec
        self.steps, self.s, self.n_replace, self.blend, self.trace = steps, s, n_replace, blend, trace
        self.kept, self.pending = kept, None  # pending: this step's recording state (its rows go into `kept`)
        self.regions = [Region(r.src.to(x_ref.device), r.dst.to(x_ref.device), r.mask_op) for r in regions]
        self.early = self.late = None
        if regions:
            if len(regions) != n:
                raise ValueError(f"need one region per reference: {n} references, {len(regions)} regions")
            src, dst = [r.src for r in self.regions], [r.dst for r in self.regions]
            every = s.concat and s.concat_steps == "all"
            self.early = RefState(n, src, dst, replace=True, share=every, positions=s.positions, share_refs=every)
            self.late = (RefState(n, src, dst, share=True, positions=s.positions, share_refs=every)
                         if s.concat else None)
        elif n and (n_replace or s.concat or blend):
            raise ValueError("token replacement, concatenation and blending need one region per reference")
        self.eta_steps = range(int(s.start * steps), min(int(s.stop * steps), steps))
        self.last_step = steps - 1 if (keep or s.concat) else n_replace - 1   # the last step that reads them

    def before(self, i: int, t: float, img: Tensor) -> tuple[Tensor, sampling.BranchInputs | None]:
        if self.blend and self.n and i <= self.n_replace:  # i = n_replace: the blend after the last replacement
            img = copy_tokens(torch.cat([self.x, img]), self.n, self.regions)[self.n:]
        if self.n and i > self.last_step:  # nothing reads the references any more: they leave the batch
            self.n = 0
        state = (self.early if i < self.n_replace else self.late) if self.n else None
        if self.trace is not None:
            if state is not None:
                state.trace = []
            self.trace.append(dict(step=i, t=t, n_ref=self.n, replace=bool(state is not None and state.replace),
                                   share=bool(state is not None and state.share),
                                   x=torch.cat([self.x[:self.n], img]).clone(),
                                   layers=state.trace if state is not None else []))
        if not self.n:
            return img, None
        tt = torch.full((self.n,), t, device=img.device, dtype=img.dtype)
        if self.kept is None:  # one batch [references; targets]
            return img, sampling.BranchInputs(self.x, self.ids, self.txt, self.txt_ids, self.vec, tt, state)
        if self.kept.cached(i):  # the step's rows were kept: the references do not run
            self.kept.cache.hits += 1
            return img, sampling.BranchInputs(self.x[:0], self.ids[:0], self.txt[:0], self.txt_ids[:0], self.vec[:0],
                                              tt[:0], replace(state, kept=self.kept.rows[i]), separate=True)
        self.pending = state.recording()  # the references alone, keeping what the targets read
        return img, sampling.BranchInputs(self.x, self.ids, self.txt, self.txt_ids, self.vec, tt, self.pending,
                                          separate=True)

    def after(self, i: int, t: float, t_next: float, v: Tensor, img: Tensor) -> Tensor:
        """Move the references one Euler step, controlled towards their clean latents; the targets unchanged."""
        if self.kept is not None and self.kept.cached(i):
            self.x = self.kept.x[i + 1]
        else:
            e = self.s.eta if i in self.eta_steps else 0.0
            if self.s.decay_eta:
                e = e * (1 - i / self.steps) ** self.s.eta_decay_power
            if e:
                v = v + e * ((self.x.float() - self.y0) / t - v)
            self.x = (self.x.float() + (t_next - t) * v).to(self.x.dtype)
            if self.kept is not None:
                self.kept.keep(i, self.pending.kept, self.x)
        if self.blend and i == self.steps - 1 and self.n_replace == self.steps:  # τ = 0: blended to the end
            img = copy_tokens(torch.cat([self.x, img]), self.n, self.regions)[self.n:]
        return img
