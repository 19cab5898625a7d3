"""The benchmark scripts run end to end (smoke mode on CPU), so they do not rot between GPU sessions."""
import subprocess
import sys

from conftest import ROOT


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_step_bench_smoke():
    out = run("bench/step.py", "--smoke")
    assert "diffusers" in out and "ratio" in out
    assert "max abs diff of outputs: 0.000e+00" in out or float(out.split("max abs diff of outputs: ")[1].split()[0]) < 1e-4


def test_load_memory_bench_small():
    out = run("bench/load_memory.py", "--hidden", "128", "--heads", "2", "--depth", "1", "--single", "1",
              "--compute", "float32")
    assert "peak RSS / loaded model size" in out


def test_freecus_bench_small():
    out = run("bench/freecus.py", "--steps", "1", "--repeats", "1")
    assert "denoising loop only" in out and "x |" in out


def test_edit_blend_bench_small():
    out = run("bench/edit_blend.py", "--size", "64", "--steps", "1")
    assert "| inpaint | paper (blend on) |" in out and "| outpaint | official, blend=True |" in out


def test_record_appends_inside_its_own_section(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    common.RESULTS.write_text("# Benchmark results\n\n## A\n\nintro A\n\n## B\n\nintro B\n")
    common.record("A", "| row a |")
    common.record("C", "| row c |", intro="intro C")
    common.record("B", "| row b |")
    assert common.RESULTS.read_text() == ("# Benchmark results\n\n## A\n\nintro A\n\n| row a |\n\n## B\n\nintro B\n\n"
                                          "| row b |\n\n## C\n\nintro C\n\n| row c |\n")
