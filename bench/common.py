"""Shared timing helper of the benchmark scripts."""
import time
from pathlib import Path

import torch


def alternate(baseline, ours, repeats: int, cuda: bool, warmup: bool = True,
              log=None) -> tuple[list[float], list[float]]:
    """Wall times of `repeats` calls of each, alternating the two so that a change in machine load hits both
    alike, after one warm-up call each (`warmup=False`: the caller has already called each once). `log(i, a, b)`,
    if given, is called after each pair. Returns (baseline times, our times) in seconds."""
    def once(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    if warmup:
        baseline(), ours()
    pairs = []
    for i in range(repeats):
        pairs.append((once(baseline), once(ours)))
        if log:
            log(i, *pairs[-1])
    return [a for a, _ in pairs], [b for _, b in pairs]


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(section: str, text: str, intro: str = "", replace: str | None = None) -> None:
    """Append `text` at the end of the `## {section}` section of bench/RESULTS.md (creating the file and the
    section, with `intro`, if needed), so every script's tables stay under their own heading. With `replace`, a
    block of that section that begins with the line starting with `replace` (up to the next `### ` or `## `
    heading) is replaced by `text` instead, if there is one: a script can record its table as it grows."""
    heading = f"## {section}"
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if heading not in body:
        body = body.rstrip("\n") + f"\n\n{heading}\n" + (f"\n{intro.rstrip()}\n" if intro else "")
    start = body.index(heading)
    nxt = body.find("\n## ", start + len(heading))
    end = len(body) if nxt < 0 else nxt + 1
    at = body.find("\n" + replace, start, end) if replace else -1
    if at >= 0:
        stop = min(i for i in (body.find("\n### ", at + 1, end), body.find("\n## ", at + 1, end), end) if i >= 0)
        stop = end if stop == end else stop + 1
        RESULTS.write_text(body[:at + 1] + text.strip("\n") + "\n" + ("\n" if stop < len(body) else "") + body[stop:])
        return
    body = body[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + ("\n" + body[end:] if nxt >= 0 else "")
    RESULTS.write_text(body)
