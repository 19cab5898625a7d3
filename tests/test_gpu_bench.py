"""bench/gpu.py, the one script a lent GPU runs, cannot rot on CPU-only CI: its smoke run goes through every item and
prints every table; its record step writes into copies only; and the wheel folder it installs from on a machine
without network installs offline into a fresh environment."""
import hashlib
import json
import os
import site
import subprocess
import sys

import pytest

from conftest import ROOT

REAL = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md"]
TITLES = ["Fused attention kernel", "FLUX.1-dev transformer step", "Cost per image", "Peak GPU memory"]


def digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def gpu(*args, **kw):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "bench/gpu.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env, **kw)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "out"
    before = digest(REAL)
    r = gpu("--smoke", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert digest(REAL) == before
    return out, r.stdout


def test_smoke_runs_every_item_and_prints_every_table(smoke):
    out, stdout = smoke
    res = json.loads((out / "results.json").read_text())
    assert list(res["items"]) == ["kernel", "step", "methods", "memory"]
    assert {name: t["status"] for name, t in res["items"].items()} == dict.fromkeys(res["items"], "ok")
    tables = stdout[stdout.index("### CPU (smoke run"):]  # the tables come last
    for title in TITLES:
        assert f"**{title}" in tables
    kernel, step, methods = (res["items"][k] for k in ("kernel", "step", "methods"))
    assert "12 of 12 ok" in kernel["notes"][0]
    assert len(kernel["rows"]) == 3                     # one shape, masks 100/30/0 %
    assert [r[:2] for r in step["rows"]] == [["diffusers", "eager"], ["minidit", "eager"],
                                             ["minidit", "compiled"], ["diffusers", "compiled"]]
    for r in step["rows"][1:]:                          # same weights through minidit's key plan: same outputs
        assert float(r[-1].split()[-1]) < 1e-5
    assert [r[0] for r in methods["rows"]] == ["plain generate", "Personalize Anything", "FreeCus"]
    assert {"gpu.log", "results.json", "tables.md"} <= {p.name for p in out.iterdir()}
    assert "=== memory: ok" in (out / "gpu.log").read_text()


def test_record_writes_only_the_copies(smoke, tmp_path):
    out, _ = smoke
    before = digest(REAL)
    refused = gpu("--record-from", str(out))  # a smoke run never goes into the real files
    assert refused.returncode != 0 and "not recorded" in refused.stderr
    res = json.loads((out / "results.json").read_text())
    res["items"]["memory"]["readme"] = [  # what memory_item writes on a GPU
        "peak GPU memory, FLUX.1-dev at 1024² (one step, batch 1), default: 33.0 GiB",
        "peak GPU memory, FLUX.1-dev at 1024² (one step, batch 1), offload=True: 23.1 GiB"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(res))
    readme, results = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text(REAL[0].read_text())
    results.write_text(REAL[1].read_text())
    r = gpu("--record-from", str(run), "--readme", str(readme), "--results", str(results))
    assert r.returncode == 0, r.stderr[-3000:]
    assert digest(REAL) == before
    text = results.read_text()
    assert text.startswith(REAL[1].read_text().rstrip("\n"))     # appended, nothing else changed
    assert "## GPU run (bench/gpu.py)" in text and "triton" in text.split("## GPU run (bench/gpu.py)")[1]
    for title in TITLES:
        assert f"**{title}" in text
    new = readme.read_text()
    assert "## Not measured yet" not in new and "## Measured on a GPU" in new
    assert "Not measured yet" not in new and "default: 33.0 GiB; offload=True: 23.1 GiB" in new
    assert "Personalize Anything at 64², 28 steps" in new     # the methods' figures, from the run
    assert new.count("\n## ") == REAL[0].read_text().count("\n## ")  # every other section kept


def test_bf16_peak_reads_the_device_name():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import bf16_peak
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989, "NVIDIA GH200 480GB": 989,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA L40S": 362, "NVIDIA L4": 121, "NVIDIA A10": 125,
             "NVIDIA A10G": None, "NVIDIA GeForce RTX 4090": 165, "Some Future GPU": None}
    assert {n: bf16_peak(n) for n in names} == names


@pytest.mark.slow
def test_wheel_folder_installs_offline_into_a_fresh_venv(tmp_path):
    """What the GPU machine does: Python with torch and minidit's dependencies but neither diffusers nor minidit
    installed, no network. Emulated by a fresh venv that sees this interpreter's site-packages except diffusers
    and minidit (a folder of links), with every proxy pointing nowhere. The folder is made for this Python's
    version (the GPU machine's default, 3.12, differs only in the cp312 builds of regex, pyyaml and
    charset_normalizer): one download instead of two keeps the test near a minute."""
    wheels = tmp_path / "wheels"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    r = subprocess.run(["bash", "bench/gpu_wheels.sh", str(wheels), here], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pin = subprocess.run([sys.executable, "bench/gpu_env.py", "pin"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    names = [p.name.lower() for p in wheels.glob("*.whl")]
    assert f"diffusers-{pin.split('==')[1]}-py3-none-any.whl" in names
    assert not [n for n in names if n.startswith(("torch-", "numpy-", "pillow-", "safetensors-"))]
    assert sum(p.stat().st_size for p in wheels.iterdir()) < 32 * 2 ** 20  # small enough to carry

    view = tmp_path / "site"
    view.mkdir()
    for d in site.getsitepackages():
        for entry in os.scandir(d):
            name = entry.name.lower()
            if name.startswith(("diffusers", "minidit", "__editable__", "_minidit")) or name.endswith(".pth") \
                    or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry.path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (venv / purelib / "view.pth").write_text(f"{view}\n")
    assert subprocess.run([py, "-c", "import diffusers"], cwd=tmp_path, capture_output=True).returncode != 0

    offline = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    r = subprocess.run([py, str(ROOT / "bench" / "gpu_env.py"), "--wheels", str(wheels)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=offline)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"diffusers: {pin.split('==')[1]} {venv}" in r.stdout       # installed into the fresh venv
    assert "minidit.kernels.ref_attention: ok" in r.stdout and "installed editable" in r.stdout
