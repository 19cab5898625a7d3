"""Shared timing helper of the benchmark scripts."""
import time
from pathlib import Path

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


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(section: str, text: str, intro: str = "") -> None:
    """Append `text` at the end of the `## {section}` section of bench/RESULTS.md (creating the file and the
    section, with `intro`, if needed), so every script's tables stay under their own heading."""
    heading = f"## {section}"
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if heading not in body:
        body = body.rstrip("\n") + f"\n\n{heading}\n" + (f"\n{intro.rstrip()}\n" if intro else "")
    start = body.index(heading)
    nxt = body.find("\n## ", start + len(heading))
    end = len(body) if nxt < 0 else nxt + 1
    body = body[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + ("\n" + body[end:] if nxt >= 0 else "")
    RESULTS.write_text(body)
