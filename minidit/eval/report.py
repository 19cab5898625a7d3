"""The report of an evaluation: OUT/metrics.json, OUT/metrics.md and OUT/tradeoff.png from the merged lines.

Per method row: the count of images and, for each metric, the mean and a 95 % interval, mean ± 1.96·s/√n
(s the sample standard deviation over the row's images; a normal approximation; none for n < 2). Everything is
computed in the plan's order with math.fsum, so the same lines give the same bytes.

The plot (drawn with PIL: matplotlib is not a dependency) puts prompt fidelity on x and subject fidelity on y,
one point per row, the shape of Personalize Anything's Table 3 (τ trades CLIP-T for CLIP-I / DINO): CLIP-T vs
CLIP-I and vs DINO when the CLIP / DINO checkpoints were given, and for --world the detectors' background
accuracy vs subject colour accuracy and vs subject PSNR.

The papers' published numbers are not printed beside the rows: the tables of Personalize Anything (Table 1, 3)
and FreeCus (ablations) could not be retrieved and checked from this workplace, and a number without a checked
citation would mislead. metrics.md says so.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

METRICS = ("clip_t", "clip_i", "dino", "world_background", "world_colour", "world_shape", "world_psnr")
NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "world_background": "background right",
         "world_colour": "subject colour right", "world_shape": "subject shape right", "world_psnr": "subject PSNR (dB)"}
PANELS = (("clip_t", "clip_i"), ("clip_t", "dino"), ("world_background", "world_colour"),
          ("world_background", "world_psnr"))
COLOURS = {"plain": (110, 110, 110), "personalize": (40, 90, 200), "freecus": (220, 110, 20)}
Z95 = 1.959963984540054
NO_PAPERS = ("The seed papers' published numbers are not put beside these rows: Personalize Anything's Table 1 / 3 "
             "and FreeCus' ablation table could not be retrieved and checked from this workplace, and an uncited "
             "number would mislead.")


def stats(values: list[float]) -> dict:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "count": n}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "count": n}


def summarise(lines: list[dict], rows) -> list[dict]:
    out = []
    for row in rows:
        mine = [d for d in lines if d["row"] == row.label]
        if not mine:
            continue
        entry = {"row": row.label, "method": row.method, "settings": row.record(), "count": len(mine)}
        for m in METRICS:
            vals = [d[m] for d in mine if d.get(m) is not None]
            if vals:
                entry[m] = stats(vals)
        out.append(entry)
    return out


def _fmt(s: dict, metric: str) -> str:
    digits = 2 if metric == "world_psnr" else 3
    if s["ci95"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"


def markdown(summary: list[dict], meta: dict) -> str:
    present = [m for m in METRICS if any(m in e for e in summary)]
    lines = ["# Evaluation", ""]
    for key, m in meta["metrics"].items():
        lines.append(f"- {key.upper()}: {m['checkpoint']} ({m['folder']}); transform: {m['transform']}")
    if not meta["metrics"]:
        lines.append("- no CLIP / DINO checkpoint given (--metric-clip, --metric-dino): no CLIP-T, CLIP-I, DINO")
    lines += [f"- {meta['steps']} steps, intra-op threads pinned to {meta['threads']}; 95 % interval: "
              "mean ± 1.96·s/√n over the row's images", f"- {NO_PAPERS}", ""]
    lines.append("| row | n | " + " | ".join(NAMES[m] for m in present) + " |")
    lines.append("|---|---|" + "---|" * len(present))
    for e in summary:
        cells = [_fmt(e[m], m) if m in e else "" for m in present]
        lines.append(f"| {e['row']} | {e['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    panels = [p for p in PANELS if any(p[0] in e and p[1] in e for e in summary)]
    W, H, pad = 460, 360, 56
    canvas = Image.new("RGB", (W * max(1, len(panels)), H), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if not panels:
        draw.text((10, 10), "no metric pairs to plot", fill="black", font=font)
    for k, (mx, my) in enumerate(panels):
        pts = [(e[mx]["mean"], e[my]["mean"], e) for e in summary if mx in e and my in e]
        x0 = k * W
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo_x, hi_x = min(xs), max(xs)
        lo_y, hi_y = min(ys), max(ys)
        span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0
        lo_x, hi_x, lo_y, hi_y = lo_x - 0.1 * span_x, hi_x + 0.1 * span_x, lo_y - 0.1 * span_y, hi_y + 0.1 * span_y

        def at(x, y):
            return (x0 + pad + (x - lo_x) / (hi_x - lo_x) * (W - 2 * pad),
                    H - pad - (y - lo_y) / (hi_y - lo_y) * (H - 2 * pad))

        draw.rectangle([x0 + pad, pad, x0 + W - pad, H - pad], outline=(0, 0, 0))
        for t in range(5):
            fx, fy = lo_x + (hi_x - lo_x) * t / 4, lo_y + (hi_y - lo_y) * t / 4
            px, _ = at(fx, lo_y)
            _, py = at(lo_x, fy)
            draw.line([px, H - pad, px, H - pad + 4], fill="black")
            draw.text((px - 14, H - pad + 6), f"{fx:.3g}", fill="black", font=font)
            draw.line([x0 + pad - 4, py, x0 + pad, py], fill="black")
            draw.text((x0 + 4, py - 5), f"{fy:.3g}", fill="black", font=font)
        draw.text((x0 + W // 2 - 30, H - 22), NAMES[mx], fill="black", font=font)
        draw.text((x0 + pad, 8), f"{NAMES[my]} vs {NAMES[mx]}", fill="black", font=font)
        placed: list[tuple[float, float, float, float]] = []  # label boxes so far: labels never overlap
        for x, y, e in pts:
            px, py = at(x, y)
            c = COLOURS.get(e["method"], (0, 150, 0))
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
            label = e["row"].replace("personalize", "PA").replace("freecus", "FreeCus")[:34]
            w = draw.textlength(label, font=font)
            lx = px + 6 if px + 6 + w < x0 + W - 2 else px - 6 - w  # right of the point, or left at the edge
            for dy in (0, 11, -11, 22, -22, 33, -33, 44, -44, 55, -55):
                box = (lx, py - 6 + dy, lx + w, py + 5 + dy)
                if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                    break
            placed.append(box)
            draw.text(box[:2], label, fill=c, font=font)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


def write(out: Path, lines: list[dict], rows, meta: dict) -> dict:
    summary = summarise(lines, rows)
    result = {**meta, "papers": NO_PAPERS, "rows": summary}
    for name, text in (("metrics.json", json.dumps(result, indent=1) + "\n"), ("metrics.md", markdown(summary, meta))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    plot(summary, out / "tradeoff.png")
    return result
