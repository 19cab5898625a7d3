"""RefState: the one explicit object that tells the transformer what reference images do in a forward pass.

Both personalization methods run the reference as extra items at the front of the batch,

    batch = [ref_0, ..., ref_{n_ref-1}, target_0, ..., target_{T-1}]

and touch the target in only two places of every block (see `DoubleStreamBlock.forward` and
`SingleStreamBlock.forward` in transformer.py):

1. token replacement  (Personalize Anything, t > τ): after the q/k/v projection, the target's image-token rows
   at `dst[r]` are overwritten by reference r's rows at `src[r]`. The projection and the QK-norm are row-wise,
   so this is exactly "replace the tokens before the q/k/v projections"; the MLP path and the residual stream
   are left alone, as in the authors' code. The target keeps its own positions (RoPE comes after).
2. reference keys/values (Personalize Anything t ≤ τ, FreeCus on vital layers): the target's joint attention
   also sees the reference's image keys/values — masked to the subject, keys scaled by λ_r, text keys by λ_p —
   through the single `attention(...)` entry. The reference items themselves attend normally (unless
   `share_refs`: Personalize Anything's released code appends the subject tokens for every batch item).

Layers are counted over the double blocks then the single blocks (FLUX.1: 0-18 double, 19-56 single).

The references in their own forward pass (`kept`, issue 27's sharing). Nothing the references compute depends on
the targets, so the same step can also run as two passes: the references alone, their state recording what the
targets read into `kept` (layer -> rows), then the targets alone with `for_targets()` (no references in the batch),
whose branches read the rows from `kept` instead of from batch items. Same method, other float rounding than the
one batch (the rows of a matrix product depend slightly on how many rows it has); what it buys is that `kept` can
be stored and read again by other targets (refcache.py).
"""
from __future__ import annotations

from collections.abc import Container
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .rope import apply_rope

POSITIONS = ("own", "target", "zero")


@dataclass
class RefState:
    n_ref: int                                  # references: the first n_ref batch items (but see
                                                # refs_in_batch)
    src: list[Tensor]                           # per reference: its subject's image-token indices (its own grid)
    dst: list[Tensor] | None = None             # per reference: target image-token indices they map to (None: = src)
    replace: bool = False                       # 1. overwrite target rows dst[r] with reference rows src[r]
    share: bool = False                         # 2. reference K/V join the target's attention ...
    layers: Container[int] | None = None        # ... on these layers (None: every layer)
    positions: str = "own"                      # RoPE of shared reference keys: "own" = the reference's own
                                                # positions (FreeCus), "target" = positions of dst (Personalize
                                                # Anything's code), "zero" = position (0,0,0) (its paper)
    lambda_ref: float = 1.0                     # λ_r: logit scale of reference keys
    lambda_txt: float = 1.0                     # λ_p: logit scale of the target's text keys (only where shared)
    mask_mode: str = "exclude"                  # masked reference keys: "exclude" or "zero" (see attention.py)
    share_refs: bool = False                    # the reference items attend to the shared K/V too (Personalize
                                                # Anything's released attn_processor appends them for every item)
    last_layer: int | None = None               # reference items leave the batch after this layer (FreeCus needs
                                                # them only up to the last vital layer); None: keep to the end
    kept: dict | None = None                    # the rows the targets read, per layer (see the module docstring):
                                                # filled while the references run alone, read by `for_targets()`
    refs_in_batch: bool = True                  # False: a pass of the targets alone, reading `kept`
    trace: list | None = field(default=None, repr=False)  # tests: blocks append (layer, q, k, v) image rows
    _mask: Tensor | None = field(default=None, init=False, repr=False)  # the shared-key mask, built once

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if len(self.src) != self.n_ref or (self.dst is not None and len(self.dst) != self.n_ref):
            raise ValueError(f"need one src (and dst) index set per reference: n_ref={self.n_ref}, "
                             f"got {len(self.src)} src and {None if self.dst is None else len(self.dst)} dst")
        for s, d in zip(self.src, self.dst or self.src):
            if s.numel() != d.numel():
                raise ValueError(f"src and dst must have the same number of tokens, got {s.numel()} and {d.numel()}")

    def targets(self, r: int) -> Tensor:
        return self.src[r] if self.dst is None else self.dst[r]

    def shares(self, layer: int) -> bool:
        return self.share and (self.layers is None or layer in self.layers)

    @property
    def n_batch(self) -> int:
        """How many reference items lead this forward's batch (0 in a pass of the targets alone)."""
        return self.n_ref if self.refs_in_batch else 0

    def recording(self) -> "RefState":
        """This state for a pass of the references alone that keeps what the targets read (a fresh `kept`)."""
        return dataclasses.replace(self, kept={}, refs_in_batch=True)

    def for_targets(self) -> "RefState":
        """This state for a pass of the targets alone, reading the rows a recording pass kept."""
        if self.kept is None:
            raise ValueError("a pass of the targets alone needs the rows its references kept (RefState.kept)")
        return dataclasses.replace(self, refs_in_batch=False, last_layer=None)

    def rows(self, key, compute):
        """The reference rows `key` names: computed from the batch's reference items (and kept when recording),
        or, in a pass of the targets alone, read from `kept`."""
        if not self.refs_in_batch:
            return self.kept[key]
        rows = compute()
        if self.kept is not None:
            self.kept[key] = rows
        return rows

    # -- 1. token replacement -------------------------------------------------------------------------------
    def replace_tokens(self, qkv: tuple[Tensor, ...], layer: int, offset: int = 0) -> tuple[Tensor, ...]:
        """qkv: q, k, v (B, H, L, D) of one layer; image tokens start at `offset`. Returns them with every target's
        rows at dst[r] set to reference r's rows at src[r]."""
        n = self.n_batch
        rows = self.rows((layer, "replace"), lambda: [[x[r:r + 1, :, self.src[r].to(x.device) + offset]
                                                       for r in range(self.n_ref)] for x in qkv])
        if qkv[0].shape[0] == n:  # the references alone: no target to write into
            return qkv
        out = []
        for x, per_ref in zip(qkv, rows):
            x = x.clone()
            for r, row in enumerate(per_ref):
                x[n:, :, self.targets(r).to(x.device) + offset] = row
            out.append(x)
        return tuple(out)

    # -- 2. reference keys/values ------------------------------------------------------------------------------
    def reference_kv(self, k: Tensor, v: Tensor, pe: Tensor, n_txt: int, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """From the whole batch's un-rotated k, v (B, H, L, D) and pe (B, 1, L, D/2, 2, 2), the reference keys
        and values every target sees: (T, H, R, D) each, keys rotated, and the subject mask (T, R) bool
        (T = the targets, or every item with `share_refs` or in a pass of the targets alone).

        positions="own": all image tokens of every reference at their own positions, with the subject mask
        (the attention kernel skips fully masked key blocks); otherwise only the subject tokens, gathered,
        rotated at their target positions (or not at all for "zero"), mask all true. Every item of a batch has
        the same image positions (the references are drawn at the targets' size), so item 0's pe serves both.
        """
        n = self.n_batch
        T = k.shape[0] if (self.share_refs or n == 0) else k.shape[0] - n  # the items that see the shared keys
        rk, rv = self.rows((layer, "kv"), lambda: self.gather_kv(k, v, pe, n_txt))
        return (rk.expand(T, -1, -1, -1), rv.expand(T, -1, -1, -1),
                self.subject_mask(k.shape[2] - n_txt, T, k.device))

    def gather_kv(self, k: Tensor, v: Tensor, pe: Tensor, n_txt: int) -> tuple[Tensor, Tensor]:
        """The references' shared keys (rotated) and values, (1, H, R, D) each, from batch items 0..n_ref-1."""
        ks, vs = [], []
        for r in range(self.n_ref):
            if self.positions == "own":
                ks.append(apply_rope(k[r:r + 1, :, n_txt:], pe[r:r + 1, :, n_txt:]))
                vs.append(v[r:r + 1, :, n_txt:])
            else:
                src = self.src[r].to(k.device) + n_txt
                kr, vr = k[r:r + 1, :, src], v[r:r + 1, :, src]
                if self.positions == "target":
                    kr = apply_rope(kr, pe[:1, :, self.targets(r).to(k.device) + n_txt])
                ks.append(kr), vs.append(vr)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def subject_mask(self, n_img: int, T: int, device) -> Tensor:
        """(T, R) bool over the shared reference keys; built once per RefState (same tensor for every layer, so
        the attention kernel's per-mask block table is computed once)."""
        if self._mask is None or self._mask.device != torch.device(device) or self._mask.shape[0] != T:
            parts = []
            for r in range(self.n_ref):
                if self.positions == "own":  # all image tokens of the reference, the subject marked
                    m = torch.zeros(n_img, dtype=torch.bool, device=device)
                    m[self.src[r].to(device)] = True
                else:  # only the gathered subject tokens
                    m = torch.ones(self.src[r].numel(), dtype=torch.bool, device=device)
                parts.append(m)
            self._mask = torch.cat(parts).expand(T, -1)
        return self._mask

    def record(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        if self.trace is not None:
            self.trace.append((layer, q.detach().clone(), k.detach().clone(), v.detach().clone()))
