"""The CLI's checks before any model loads match the API (issue 24 classes 6 and 9), its options and help (issue 25
items 6, 7, 9): each bad case is one `error:` line naming the option, and Pipeline.load is never reached."""
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT
from minidit.cli import commands, main
from minidit.pipeline import Pipeline


class Loaded(Exception):
    pass


@pytest.fixture
def no_load(monkeypatch):
    """Pipeline.load raises Loaded: a check that passes reaches it, a check that fails never does."""
    def load(*a, **k):
        raise Loaded
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, *a, **k: load()))


def photo(path, size):
    Image.new("RGB", size, (200, 40, 40)).save(path)
    return str(path)


def error(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code) if isinstance(e.value.code, str) else (capsys.readouterr().err if capsys else "")
    assert msg.startswith(("error:", "minidit")) and msg.strip().count("\n") == 0, msg
    return msg


def test_help_and_usage_errors_import_no_torch():
    """`minidit generate --help` and a usage error never import torch (issue 25 item 7; bench/cli_start.py)."""
    code = ("import sys\nfrom minidit.cli import main\nfor argv in ({}):\n    try:\n        main(argv)\n"
            "    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    for argv in ("['--help']", "['generate', '--help'], ['personalize', '--help']", "['generate', '--steps', 'x']"):
        r = subprocess.run([sys.executable, "-c", code.format(argv)], cwd=ROOT, capture_output=True, text=True)
        assert r.stdout.strip().splitlines()[-1] == "False", (argv, r.stdout[-500:], r.stderr[-500:])


def test_help_shows_the_models_defaults_and_each_help_text_once(capsys):
    for name in ("generate", "img2img", "personalize", "inpaint", "outpaint", "freecus", "info"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "(required) (required)" not in out, name
        if name in ("generate", "img2img", "personalize", "freecus"):
            assert "256 for the built-in model" in out and "28 for the built-in model" in out, name
        if name == "info":
            assert "a FLUX.1 folder" in out
        if name in ("personalize", "outpaint"):
            assert "placement=" in out or "offset=(x, y)" in out, name


def test_img2img_takes_any_photo_size_and_the_models_size(tmp_path, no_load, monkeypatch):
    """A 100 px photo is a valid img2img / outpaint input (it is resized / pasted), unlike a reference."""
    seen = {}
    monkeypatch.setattr(commands, "load_pipeline", lambda args, checked=False: (
        commands.check_inputs(args), seen.update(vars(args)), (_ for _ in ()).throw(Loaded()))[0])
    small = photo(tmp_path / "small.png", (100, 100))
    with pytest.raises(Loaded):
        main(["img2img", "--image", small, "--prompt", "x", "--output", str(tmp_path / "o.png")])
    assert (seen["height"], seen["width"], seen["steps"], seen["true_cfg"]) == (256, 256, 28, 4.0)
    with pytest.raises(Loaded):
        main(["outpaint", "--image", small, "--prompt", "x", "--canvas", "256x256", "--output", str(tmp_path / "o.png")])


@pytest.mark.parametrize("argv, named", [
    (["freecus", "--ref", "{ref}", "--prompt", "x", "--vital-layers", "0,99"], "--vital-layers"),
    (["freecus", "--ref", "{ref}", "--prompt", "x", "--no-ans", "--mu-shift-type", "normal"], "--no-ans"),
    (["personalize", "--ref", "{ref}", "--prompt", "x", "--no-perturb", "--set", "perturb=true"], "--no-perturb"),
    (["personalize", "--ref", "{ref}", "--prompt", "x", "--box", "200,200,100,100"], "--box"),
    (["personalize", "--ref", "{ref}", "--prompt", "x", "--offset", "99999999999999999999999,0"], "--offset"),
    (["outpaint", "--image", "{ref}", "--prompt", "x", "--canvas", "64x64"], "--offset/--canvas"),
    (["outpaint", "--image", "{ref}", "--prompt", "x", "--canvas", "512x512", "--offset", "9" * 30 + ",0"], "--offset"),
    (["outpaint", "--image", "{ref}", "--prompt", "x", "--canvas", "99999x512"], "canvas"),
    (["generate", "--prompt", "x", "--threads", "0"], "--threads must be"),
    (["generate", "--prompt", "x", "--weights", "~nosuchuser_minidit/flux"], "error:"),
    (["personalize", "--ref", "{ref}", "--prompt", "x", "--set", "tau=abc"], "tau"),
])
def test_bad_options_are_one_named_error_before_any_model_loads(tmp_path, no_load, capsys, argv, named):
    ref = photo(tmp_path / "ref.png", (256, 256))
    msg = error([a.replace("{ref}", ref) for a in argv] + ["--output", str(tmp_path / "o.png")], capsys)
    assert named in msg, msg


def test_attention_backend_is_checked_before_loading(tmp_path, no_load, monkeypatch):
    """MINIDIT_ATTENTION=triton without triton (and an unknown name) is a named error, not a ModuleNotFoundError."""
    import importlib.util

    from minidit import attention
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find(name, *a))
    attention.set_backend("triton")
    try:
        msg = error(["generate", "--prompt", "x", "--output", str(tmp_path / "o.png")])
    finally:
        attention.set_backend(None)
    assert "triton is not installed" in msg
    monkeypatch.setenv("MINIDIT_ATTENTION", "flash9")
    assert error(["generate", "--prompt", "x", "--output", str(tmp_path / "o.png")]).startswith(
        "error: MINIDIT_ATTENTION=flash9: unknown")


def test_seed_minus_one_is_random_and_outputs_are_numbered_never_overwritten(tmp_path, monkeypatch, capsys):
    """--seed -1 draws a random seed; the default output is a folder of numbered COMMAND-NNNN-sSEED.png files, so a
    second run never replaces the first; the echoed prompt is whole (not cut at 60 characters)."""
    monkeypatch.chdir(tmp_path)
    long = "a large red striped circle in the centre, on a blue background, and a small green square"
    main(["generate", "--prompt", long, "--prompt", "x", "--seed", "-1", "--steps", "1"])
    err = capsys.readouterr().err
    assert repr(long) in err and "(random; pass --seed" in err
    first = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    seed = int(err.split("seed ")[1].split()[0])
    assert first == [f"generate-0000-s{seed}.png", f"generate-0001-s{seed}.png"]
    main(["generate", "--prompt", "x", "--seed", "5", "--steps", "1", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == first + ["generate-0002-s5.png"]
