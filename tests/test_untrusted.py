"""Issue 24: a PNG from the internet must not overwrite or read your files (class 1), one guarded reader for every
file (class 2), bounded counts (class 3), images saved as they are made (class 4), one exact image reader (class 5),
and class 9's FIFO / symlinked-snapshot cases. Every CLI error is one line before any model loads, nothing written;
cases that used to hang run in a child process with a timeout."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import ROOT
from minidit.cli import main, record
from minidit.cli.record import JSON_KEY, read_png, weights_record
from minidit.files import FileError
from minidit.loading import CheckpointError
from minidit.masks import image_tensor
from minidit.weights.tiny import write_tiny_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("untrusted") / "FLUX.1-dev", "dev", seed=6)


@pytest.fixture(scope="module")
def made(repo, tmp_path_factory):
    """A real img2img PNG (its input beside it) and its record."""
    folder = tmp_path_factory.mktemp("made")
    Image.new("RGB", (16, 16), "red").save(folder / "in.png")
    main(["img2img", "--weights", str(repo), "--image", str(folder / "in.png"), "--prompt", "a fox", "--seed", "2",
          "--steps", "1", "--quiet", "--output", str(folder / "o.png")])
    return folder, read_png(folder / "o.png")


@pytest.fixture
def no_load(monkeypatch):
    from minidit.pipeline import Pipeline
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("the model loaded before the error"))


def crafted(path, rec) -> str:
    info = PngInfo()
    info.add_text(JSON_KEY, rec if isinstance(rec, str) else json.dumps(rec))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return str(path)


def one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg
    return msg


def child(code: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Python in a child process (a FIFO case hung the CLI before: the timeout fails the test instead)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# ---- class 1: a --from-png record is untrusted ----------------------------------------------------------------

def test_record_cannot_choose_outputs_prompt_files_or_weights(repo, made, tmp_path, monkeypatch):
    folder, rec = made
    victim, secret = tmp_path / "victim.png", tmp_path / "secret.txt"
    victim.write_bytes(b"precious")
    secret.write_text("the secret line\n")
    evil = json.loads(json.dumps(rec))
    evil["args"].update(output=str(victim), prompt_file=str(secret), weights="/nowhere", transformer="/nowhere/x",
                        outputs=[str(victim)], func="nope")
    png = crafted(folder / "evil.png", evil)
    main(["img2img", "--from-png", png, "--weights", str(repo), "--quiet", "--output", str(tmp_path / "new.png")])
    assert victim.read_bytes() == b"precious"
    again = read_png(tmp_path / "new.png")
    assert again["prompt"] == "a fox" and "secret" not in json.dumps(again)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "new.png")), np.asarray(Image.open(folder / "o.png")))
    (tmp_path / "run").mkdir()  # without --output: the default, never the record's
    monkeypatch.chdir(tmp_path / "run")
    main(["img2img", "--from-png", png, "--weights", str(repo), "--quiet"])
    assert victim.read_bytes() == b"precious" and len(list((tmp_path / "run").rglob("*.png"))) == 1


@pytest.mark.parametrize("name", ["ABS", "../outside/in.png", "sub/../../outside/in.png"])
def test_inputs_only_from_hashed_relative_names(made, tmp_path, no_load, name):
    folder, rec = made
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / "in.png", tmp_path / "outside" / "in.png")  # same bytes, same hash, outside the folder
    evil = json.loads(json.dumps(rec))
    name = str(tmp_path / "outside" / "in.png") if name == "ABS" else name
    evil["inputs"]["image"] = [{"file": name, "sha256": rec["inputs"]["image"][0]["sha256"]}]
    (tmp_path / "png").mkdir()
    png = crafted(tmp_path / "png" / "evil.png", evil)
    msg = one_line_error(["img2img", "--from-png", png, "--output", tmp_path / "out.png"])
    assert "not a relative file name" in msg and "--image" in msg
    assert not (tmp_path / "out.png").exists()


BAD_VALUES = [  # (key in args or a whole-record edit, value, words of the message)
    ("steps", "abc", "--steps: argument --steps: invalid int value"),
    ("steps", 2.5, "invalid int value"),
    ("steps", [2, 3], "a list where a single value belongs"),
    ("steps", 10 ** 400, "--steps must be <= 1000"),
    ("steps", 5000, "--steps must be <= 1000"),
    ("guidance", "inf", "not a finite number"),
    ("guidance", {"a": 1}, "expected a single string or number, got dict"),
    ("dtype", "fp64", "invalid choice: 'fp64'"),
    ("strength", 7, "--strength must lie in"),
    ("seed", [[1]], "expected a single string or number, got list"),
    ("seed", list(range(100)), "expected 1 to 64 values"),
    ("num_images", 10 ** 9, "images in one run"),
    ("prompt", "x" * 70000, "longer than 65536 characters"),
    ("true_cfg", True, "expected a single string or number, got bool"),
]


@pytest.mark.parametrize("key,value,words", BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_VALUES)])
def test_recorded_values_are_checked_as_command_line_input(made, tmp_path, no_load, key, value, words):
    folder, rec = made
    evil = json.loads(json.dumps(rec))
    evil["args"][key] = value
    png = crafted(folder / f"bad-{key}.png", evil)
    msg = one_line_error(["img2img", "--from-png", png, "--output", tmp_path / "o.png"])
    assert words in msg
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("text,words", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"command": "img2img", "args": {"steps": ' + "9" * 5000 + "}}", "not valid JSON"),
    ('{"command": "img2img", "args": {"steps": NaN}}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"command": "img2img", "args": [], "inputs": {}, "weights": {"fingerprint": "x"}}', "key 'args' must be a dict"),
    ('{"command": "img2img", "args": {}, "inputs": {}, "weights": {}}', "'weights.fingerprint'"),
    ('{"command": "img2img", "args": {}, "inputs": {"image": "in.png"}, "weights": {"fingerprint": "x"}}',
     "inputs.image must be a list"),
    ('{"command": "img2img", "args": {}, "inputs": {"image": [{"file": "in.png", "sha256": "zz"}]}, '
     '"weights": {"fingerprint": "x"}}', "needs a file name and its sha256"),
])
def test_record_structure(made, tmp_path, no_load, text, words):
    png = crafted(tmp_path / "s.png", text)
    assert words in one_line_error(["img2img", "--from-png", png, "--output", tmp_path / "o.png"])


def test_would_overwrite_is_checked_on_the_final_name(made, tmp_path, no_load):
    folder, rec = made
    shutil.copy(folder / "in.png", tmp_path / "in.png")
    shutil.copy(folder / "o.png", tmp_path / "x.png")
    os.link(tmp_path / "x.png", tmp_path / "hard.png")
    shutil.copy(folder / "o.png", tmp_path / "y-1.png")
    for src, argv in [("x.png", ["--output", tmp_path / "x"]),          # ".png" added: the same file
                      ("x.png", ["--output", tmp_path / "hard.png"]),   # another name of the same file
                      ("y-1.png", ["--output", tmp_path / "y", "--seed", "1", "2"])]:   # numbered: y-0, y-1
        msg = one_line_error(["img2img", "--from-png", tmp_path / src, *argv])
        assert "would overwrite the --from-png image" in msg
    assert (tmp_path / "y-1.png").read_bytes() == (folder / "o.png").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["hard.png", "in.png", "x.png", "y-1.png"]


def test_fingerprint_covers_the_scheduler_config(repo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    args = SimpleNamespace(weights=str(copy), **{k: None for k in record.COMPONENTS.values()})
    before = weights_record(args)["fingerprint"]
    cfg = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "max_shift": 2.0}))
    assert weights_record(args)["fingerprint"] != before


# ---- class 2: one guarded reader --------------------------------------------------------------------------------

def test_fifos_and_devices_are_refused_from_stat(repo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (copy / "tokenizer_2" / "tokenizer_config.json").unlink()
    os.mkfifo(copy / "tokenizer_2" / "tokenizer_config.json")
    cache = tmp_path / "cache" / "tiny-flux-dev-v1"
    cache.mkdir(parents=True)
    os.mkfifo(cache / ".complete.json")
    code = f"""
import sys
from minidit.cli import main
from minidit.text_encoder import tokenizer_max_length
from minidit.weights import tiny
for argv in (["generate", "--prompt-file", {str(fifo)!r}], ["generate", "--prompt-file", "/dev/zero"],
             ["generate", "--prompt", "x", "--from-png", {str(fifo)!r}]):
    try:
        main(argv + ["--output", {str(tmp_path / "o.png")!r}])
    except SystemExit as e:
        print(e.code)
try:
    tokenizer_max_length({str(copy / "tokenizer_2")!r})
except ValueError as e:
    print(e)
print("intact", tiny._intact(__import__("pathlib").Path({str(cache)!r})))
"""
    p = child(code)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and len(lines) == 5, p.stderr
    assert all("not a regular file" in line for line in lines[:4]), lines
    assert "--prompt-file" in lines[0] and "/dev/zero" in lines[1] and "--from-png" in lines[2]
    assert "tokenizer config" in lines[3] and lines[4] == "intact False"
    assert not (tmp_path / "o.png").exists()


def test_a_config_that_cannot_be_read_is_an_error_not_defaults(repo, tmp_path):
    from minidit.repository import read_schedule
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    cfg = copy / "scheduler" / "scheduler_config.json"
    cfg.unlink()
    cfg.mkdir()  # a folder where the config belongs
    with pytest.raises(CheckpointError, match="scheduler config .*not a regular file"):
        read_schedule(copy, guidance_embed=True)
    cfg.rmdir()
    with open(cfg, "wb") as f:  # a sparse gigabyte: refused from its size, never read
        f.truncate(1 << 30)
    with pytest.raises(CheckpointError, match="more than the 64 MiB"):
        read_schedule(copy, guidance_embed=True)
    with pytest.raises(FileError, match="more than the 64 MiB"):
        record.fingerprint([cfg])


# ---- class 3 and 4: bounded counts, images saved as they are made ----------------------------------------------

def test_total_images_are_bounded_before_planning(tmp_path, no_load):
    (tmp_path / "p.txt").write_text("a\n" * 200_001)
    msg = one_line_error(["generate", "--prompt-file", tmp_path / "p.txt", "--seed", *"12345", "--output",
                          tmp_path / "o.png"])
    assert "more than 1,000,000 images in one run" in msg
    msg = one_line_error(["generate", "--prompt", "x", "--num-images", "1000000000000", "--seed", "1", "2",
                          "--output", tmp_path / "o.png"])
    assert "more than 1,000,000 images in one run" in msg


def test_a_million_line_prompt_file_is_planned_in_constant_memory(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt number {i}\n" for i in range(1_000_000)))
    code = f"""
import resource
from types import SimpleNamespace
from minidit.cli import record
args = SimpleNamespace(prompt=None, prompt_file={str(tmp_path / "p.txt")!r}, seed=[1], num_images=1,
                       output={str(tmp_path / "o.png")!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
todo = record.plan(args)
for last in todo:
    pass
print(len(todo), last, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    p = child(code)
    n, *last, grown_mib = p.stdout.split()
    assert p.returncode == 0 and n == "1000000" and last == ["('prompt", "number", "999999',", "1)"], p.stderr
    assert int(grown_mib) < 20  # the list of jobs (or of output paths) alone would take > 100 MiB


def test_each_image_is_saved_when_made_and_an_interrupt_keeps_them(tmp_path):
    pipe = SimpleNamespace(default_steps=1, variant="dev", dtype=torch.float32, device=torch.device("cpu"),
                           name="tiny", transformer=SimpleNamespace())
    args = SimpleNamespace(prompt=["a", "b", "c"], prompt_file=None, seed=[1], num_images=1, steps=1, guidance=3.5,
                           output=str(tmp_path / "o.png"), quiet=True, weights=None,
                           **{k: None for k in record.COMPONENTS.values()})
    todo = record.plan(args)

    def sample(prompt, seed):
        if prompt == "c":
            assert sorted(os.listdir(tmp_path)) == ["o-0.png", "o-1.png"]  # written before the next one starts
            raise KeyboardInterrupt
        return [Image.new("RGB", (16, 16), "red")]
    with pytest.raises(KeyboardInterrupt):
        record.run(args, pipe, "generate", todo, sample)
    assert [read_png(tmp_path / f"o-{i}.png")["prompt"] for i in range(2)] == ["a", "b"]


# ---- class 5: one exact image reader -----------------------------------------------------------------------------

def test_img2img_and_references_read_through_the_exact_reader(repo, tmp_path):
    from minidit.pipeline import Pipeline
    grey = np.full((32, 32), 128, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 16-bit: 128 * 257 = 32896
    wide = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: stored as the transposed picture
    Image.fromarray(np.ascontiguousarray(np.rot90(wide, 1))).save(tmp_path / "rotated.png", exif=exif)
    assert torch.equal(image_tensor(tmp_path / "grey16.png"), image_tensor(tmp_path / "grey8.png"))
    assert torch.equal(image_tensor(tmp_path / "rotated.png"), image_tensor(tmp_path / "upright.png"))
    pipe = Pipeline.load(repo, device="cpu")
    run = lambda image: pipe.img2img(image, "p", steps=1, seed=0, return_latents=True)  # noqa: E731
    assert torch.equal(run(tmp_path / "grey16.png"), run(tmp_path / "grey8.png"))
    assert torch.equal(run(tmp_path / "rotated.png"), run(tmp_path / "upright.png"))


def test_the_side_limit_applies_before_decoding(tmp_path):
    Image.new("L", (20000, 16)).save(tmp_path / "long.png")  # 320 k pixels: no decompression bomb, too long a side
    with pytest.raises(ValueError, match="20000x16 pixels, more than 16384 per side"):
        image_tensor(tmp_path / "long.png")


# ---- class 9: a FIFO where the transformer belongs; a snapshot linked out of the cache ---------------------------

def test_fifo_transformer_is_refused_by_generate_and_info(repo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    (copy / "flux1-dev.safetensors").unlink()
    os.mkfifo(copy / "flux1-dev.safetensors")
    code = f"""
from minidit.cli import main
for argv in (["generate", "--weights", {str(copy)!r}, "--prompt", "x", "--output", {str(tmp_path / "o.png")!r}],
             ["info", {str(copy)!r}]):
    try:
        main(argv)
    except SystemExit as e:
        print("exit", e.code)
"""
    p = child(code)
    assert p.returncode == 0, p.stderr
    assert "flux1-dev.safetensors: not a regular file" in p.stdout
    assert "transformer     UNREADABLE" in p.stdout and "Not a directory" not in p.stdout
    assert not (tmp_path / "o.png").exists()


def test_hf_snapshot_linked_out_of_the_cache_is_refused(tmp_path):
    from minidit.repository import resolve_weights
    repo = tmp_path / "models--org--name"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (repo / "snapshots" / "abc").symlink_to(tmp_path / "elsewhere")
    (repo / "refs" / "main").write_text("abc")
    with pytest.raises(CheckpointError, match="links out of the repository folder"):
        resolve_weights(repo)
    (repo / "refs" / "main").unlink()  # the newest snapshot: the same rule
    with pytest.raises(CheckpointError, match="links out of the repository folder"):
        resolve_weights(repo)
