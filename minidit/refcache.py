"""ReferenceCache: what targets read from a reference, computed once and read again by later targets.

    cache = ReferenceCache(limit_gb=8)
    for prompt in prompts:                     # one subject, many prompts (the same seed)
        image = pipe.personalize(prompt, reference, seed=0, cache=cache)[0]

Personalize Anything's reference branch does not depend on the target's prompt (the reference is inverted and
re-traced with its own prompt and the seed's noise), so every prompt of a subject reads the same rows from it: the
reference's q/k/v rows of its subject tokens at every layer of the replacement steps, its subject keys/values at
every later step. FreeCus' reference pass does depend on the prompt when it is the target's (the authors' default;
a `Reference(prompt=...)` of its own makes it shareable too).

With a cache, the reference runs in a forward pass of its own before the targets' at every step (RefState.kept,
`sampling.BranchInputs.separate`), and each step's rows are kept under a key that hashes *every* input of the
reference branch (latents, noise, prompt features, token indices, times, settings): a later call whose reference
branch is the same in every input skips the reference's passes and reads the rows; any difference is a new entry.
So images are bit-identical with and without reuse (a fresh cache per image computes everything), on every
device. (Without a cache, the entry points run the reference in one batch with the targets: the same method,
other float rounding.) A cache is tied to one model's weights: make a new one after loading other weights or
LoRAs.

Memory: an entry keeps, per step, the reference latents (N x 64 values) and, while the cache holds less than
`limit_gb`, the step's rows; a step whose rows did not fit is recomputed from its latents by every later image (the
reference's pass alone), which is exact too. Bytes per subject at 1024x1024 on FLUX.1-dev in bf16 (4096 image
tokens, 57 layers, hidden 3072; K subject tokens): Personalize Anything 57 x 3 x K x 3072 x 2 B per replacement
step (K = 1024: 1.08 GB) and 57 x 2 x K x 3072 x 2 B per later step with concatenation (0.72 GB); at 28 steps and
tau = 0.8 (6 + 22 steps), 22 GB; the "official" preset (no concatenation; tau 50 % on the shifted time replaces
22 of 28 steps at 1024x1024), 24 GB. FreeCus keeps all 4096 image keys/values of each vital layer (10 of 57): 10 x 2 x 4096 x 3072 x 2 B =
0.50 GB per step, 15 GB at 30 steps. `ReferenceCache.nbytes` says what is held.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor


def walk(x, fn):
    """`x` (tensors in nested lists, tuples and dicts) with `fn` applied to every tensor."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: walk(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(walk(v, fn) for v in x)
    return x


def nbytes(x) -> int:
    total = 0

    def add(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    walk(x, add)
    return total


def fingerprint(*parts) -> str:
    """A hash of tensors (dtype, shape, every byte), numbers, strings and None, in order (nested lists too)."""
    h = hashlib.sha256()

    def feed(p):
        if isinstance(p, Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(p, (list, tuple)):
            h.update(f"L{len(p)}".encode())
            for q in p:
                feed(q)
        else:
            h.update(f"{type(p).__name__}:{p!r};".encode())
    for p in parts:
        feed(p)
    return h.hexdigest()


class Entry:
    """One reference branch's run, step by step: x[i] the reference latents entering step i (the first is the
    branch's start), rows[i] the RefState.kept of step i (absent when it did not fit: recomputed from x[i])."""

    def __init__(self, cache: "ReferenceCache"):
        self.cache = cache
        self.x: dict[int, Tensor] = {}
        self.rows: dict[int, dict] = {}

    def cached(self, i: int) -> bool:
        """Step i can be read instead of run: its rows are kept (and, for a branch with a trajectory, the latents
        after it: `keep` stores those first)."""
        return i in self.rows

    def keep(self, i: int, rows: dict | None, x_next: Tensor | None) -> None:
        """Keep step i's rows (copies, while they fit the cache's limit) and the latents after it."""
        if x_next is not None and (i + 1) not in self.x:
            self.x[i + 1] = x_next.detach().clone()
            self.cache.nbytes += nbytes(self.x[i + 1])
        if rows is not None and i not in self.rows:
            size = nbytes(rows)
            if self.cache.nbytes + size <= self.cache.limit:
                self.rows[i] = walk(rows, lambda t: t.detach().clone())
                self.cache.nbytes += size


class ReferenceCache:
    """Entries by fingerprint (see the module docstring); `limit_gb` bounds the rows kept, over all entries."""

    def __init__(self, limit_gb: float = 8.0):
        if not (isinstance(limit_gb, (int, float)) and math.isfinite(limit_gb) and limit_gb >= 0):
            raise ValueError(f"the reference cache's limit must be a finite number of GB >= 0, got {limit_gb!r}")
        self.limit = int(limit_gb * 1e9)
        self.nbytes = 0
        self.entries: dict[str, Entry] = {}
        self.hits = 0      # steps read instead of run, over all entries (the benchmark's and the tests' count)

    def entry(self, *parts) -> Entry:
        """The entry of a reference branch whose inputs are `parts` (new and empty the first time)."""
        key = fingerprint(*parts)
        if key not in self.entries:
            self.entries[key] = Entry(self)
        return self.entries[key]
