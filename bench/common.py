"""Shared timing helper of the benchmark scripts."""
import time

import torch


def alternate(baseline, ours, repeats: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Wall times of `repeats` calls of each, alternating the two so that a change in machine load hits both
    alike, after one warm-up call each. Returns (baseline times, our times) in seconds."""
    def once(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    baseline(), ours()
    pairs = [(once(baseline), once(ours)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]
