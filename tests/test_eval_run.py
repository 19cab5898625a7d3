"""The evaluation run end to end on the tiny random FLUX repository and tiny metric checkpoints: a 2-process
torchrun (gloo) equals the 1-process run file for file, a run killed midway resumes without regenerating
finished images, an OUT holding another run is refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidit.eval.command import main
from minidit.weights.tiny import tiny_repo
from minidit.weights.tiny_metrics import write_tiny_clip_model, write_tiny_dino

from conftest import ROOT

METHODS = "plain,personalize:official,freecus:paper+no-ans"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    args = ["--world", "--world-subjects", "1", "--world-prompts", "2", "--seeds", "0", "1",
            "--height", "128", "--width", "128", "--steps", "1", "--threads", "1", "--weights", str(tiny_repo()),
            "--metric-clip", str(write_tiny_clip_model(root / "clip")),
            "--metric-dino", str(write_tiny_dino(root / "dino")), "--methods", METHODS, "--quiet"]
    return root, args


def _files(out: Path) -> dict[str, bytes]:
    """Every result file (not the run's working files) by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.parts[len(out.parts)] != "parts"}


@pytest.fixture(scope="module")
def single(setup):
    root, args = setup
    threads = torch.get_num_threads()
    try:
        main(args + ["--out", str(root / "one")])
    finally:
        torch.set_num_threads(threads)
    return root / "one"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}


def test_one_process_results(single):
    lines = [json.loads(x) for x in (single / "cases.jsonl").read_text().splitlines()]
    assert len(lines) == 1 * 2 * 2 * 3 == len(list((single / "images").rglob("*.png")))
    first = lines[0]
    for key in ("subject", "reference", "prompt", "method", "settings", "seed", "file", "clip_t", "clip_i", "dino",
                "world_background", "world_colour", "world_psnr"):
        assert key in first, key
    assert (single / first["reference"]).is_file() and (single / first["file"]).is_file()
    assert {d["row"] for d in lines} == {"plain", "personalize:official", "freecus:paper+no-ans"}
    assert [d for d in lines if d["row"] == "freecus:paper+no-ans"][0]["settings"]["mu_shift_type"] == "target"
    metrics = json.loads((single / "metrics.json").read_text())
    assert metrics["threads"] == 1 and "256 bicubic" in metrics["metrics"]["dino"]["transform"]
    rows = {r["row"]: r for r in metrics["rows"]}
    assert rows["plain"]["count"] == 4 and len(rows["plain"]["clip_t"]["ci95"]) == 2
    assert "| personalize:official | 4 |" in (single / "metrics.md").read_text()
    from PIL import Image
    with Image.open(single / "tradeoff.png") as im:  # CLIP-T vs CLIP-I / DINO, the world's two panels
        assert im.size == (4 * 460, 360)
    with Image.open(single / first["file"]) as im:
        rec = json.loads(im.text["minidit-eval"])
    assert rec["row"] == "plain" and rec["seed"] == first["seed"] and rec["prompt"] == first["prompt"]
    # any image can be made again alone from its PNG's record
    from minidit.eval.runner import remake
    one = next((single / "images" / "freecus-paper_no-ans").rglob("*.png"))
    threads = torch.get_num_threads()
    try:
        again = remake(one)
    finally:
        torch.set_num_threads(threads)
    with Image.open(one) as im:
        assert again.tobytes() == im.convert("RGB").tobytes()
    # distinct methods give distinct pixels (the rows really ran what they say)
    a, b = (single / "images" / "plain").rglob("*.png"), (single / "images" / "personalize-official").rglob("*.png")
    assert next(a).read_bytes() != next(b).read_bytes()


def test_two_process_torchrun_equals_one_process(setup, single):
    root, args = setup
    out = root / "two"
    loud = [a for a in args if a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "minidit.eval", *loud, "--out", str(out)], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 0/2]" in r.stderr and "[rank 1/2]" in r.stderr  # both ranks made images
    mine, ref = _files(out), _files(single)
    assert sorted(mine) == sorted(ref)
    assert [k for k in ref if mine[k] != ref[k]] == []
    units = sorted(p.relative_to(out / "parts") for p in (out / "parts").rglob("*.jsonl"))
    assert len(units) == 3


def test_killed_run_resumes_without_regenerating(setup, single):
    root, args = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "minidit.eval", *args, "--out", str(out)]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("images/*/*/*.png"))) < 3:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not (out / "cases.jsonl").exists()  # really killed midway
    before = {f: f.stat().st_mtime_ns for f in out.glob("images/*/*/*.png")}
    assert 3 <= len(before) < 12
    part = next(out.glob("parts/*/*.jsonl"))
    with open(part, "a") as f:
        f.write('{"subject": "torn')  # a line cut by the kill
    threads = torch.get_num_threads()
    try:
        main(args + ["--out", str(out)])  # the resumed run, in this process
    finally:
        torch.set_num_threads(threads)
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())  # finished images were not made again
    mine, ref = _files(out), _files(single)
    assert sorted(mine) == sorted(ref) and [k for k in ref if mine[k] != ref[k]] == []


def test_out_of_another_run_refused_untouched(setup, single):
    root, args = setup
    before = _files(single)
    changed = [a if a != "2" or i == 0 else a for i, a in enumerate(args)]
    changed[changed.index("--steps") + 1] = "3"
    with pytest.raises(SystemExit) as e:
        main(changed + ["--out", str(single)])
    msg = str(e.value)
    assert "holds another run's results" in msg and "steps" in msg and "\n" not in msg
    assert _files(single) == before


def test_sharing_the_reference_gives_the_same_files(setup, monkeypatch):
    """One ReferenceCache per (subject, row): the later prompts of a seed read what the first computed; the run
    writes the same files, byte for byte, as one where every image computes its reference (--no-share)."""
    import minidit.eval.runner as runner
    root, args = setup
    args = list(args)
    args[args.index("--methods") + 1] = "personalize:paper,freecus:paper+ref-caption,freecus:paper"
    args[args.index("--steps") + 1] = "2"
    caches = []

    class Counting(runner.ReferenceCache):
        def __init__(self, *a):
            super().__init__(*a)
            caches.append(self)
    monkeypatch.setattr(runner, "ReferenceCache", Counting)
    threads = torch.get_num_threads()
    try:
        main(args + ["--out", str(root / "shared")])
        shared_caches = list(caches)
        main(args + ["--out", str(root / "unshared"), "--no-share"])
    finally:
        torch.set_num_threads(threads)
    # PA and FreeCus ref-caption share (one cache per unit; the second prompt of each seed reads); FreeCus with the
    # authors' reference prompt and every --no-share image keep nothing
    assert len(shared_caches) == 2 and all(c.hits > 0 for c in shared_caches)
    assert len(caches) == 2
    shared, unshared = _files(root / "shared"), _files(root / "unshared")
    assert sorted(shared) == sorted(unshared) and [k for k in shared if shared[k] != unshared[k]] == []
    lines = [json.loads(x) for x in (root / "shared" / "cases.jsonl").read_text().splitlines()]
    assert {ln["row"] for ln in lines} == {"personalize:paper", "freecus:paper+ref-caption", "freecus:paper"}
    assert all(ln["caption"] for ln in lines if ln["method"] == "freecus")
