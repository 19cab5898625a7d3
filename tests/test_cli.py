"""Issue 14, the CLI half: metadata that reproduces an image (--from-png), seeds, several prompts, helps with
defaults and examples, separate component files, progress/quiet/closing lines. Tiny random repositories."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from minidit.cli import build_parser, main
from minidit.cli.record import read_png
from minidit.weights.tiny import write_tiny_repo

FAST = ["--height", "16", "--width", "16", "--steps", "1"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("cli") / "FLUX.1-dev", "dev", seed=3)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def cli(*argv, cwd=None):
    """`python -m minidit ...` with stdout/stderr captured (so neither is a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "minidit", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


# ---- metadata and --from-png -------------------------------------------------------------------------------

def test_from_png_reproduces_image_i_of_a_batch_exactly(repo, tmp_path):
    main(["generate", "--weights", str(repo), "--prompt", "a red cube", "--seed", "5", "--num-images", "2",
          *FAST, "--output", str(tmp_path / "o.png")])
    rec = read_png(tmp_path / "o-1.png")
    assert rec["seed"] == 6 and rec["prompt"] == "a red cube" and rec["steps"] == 1 and rec["guidance"] == 3.5
    assert (rec["width"], rec["height"], rec["dtype"], rec["device"]) == (16, 16, "float32", "cpu")
    assert rec["weights"]["files"]["transformer"].endswith("flux1-dev.safetensors")
    assert len(rec["weights"]["fingerprint"]) == 16 and rec["minidit_version"] and rec["attention"]
    text = Image.open(tmp_path / "o-1.png").text["parameters"]  # A1111: prompt line, then "Key: value, ..."
    assert text.splitlines()[0] == "a red cube" and "Steps: 1, " in text and "Seed: 6, " in text
    assert "Size: 16x16" in text and f"Model hash: {rec['weights']['fingerprint']}" in text
    main(["generate", "--from-png", str(tmp_path / "o-1.png"), "--weights", str(repo),  # weights: never from a PNG
          "--output", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "o-1.png"))  # image 1 alone, seed 6
    assert not np.array_equal(pixels(tmp_path / "o-0.png"), pixels(tmp_path / "o-1.png"))
    assert read_png(tmp_path / "again.png")["args"] == rec["args"]


def test_from_png_refusals_come_before_loading(repo, tmp_path, monkeypatch):
    x = tmp_path / "in.png"
    Image.new("RGB", (16, 16), "red").save(x)
    main(["img2img", "--weights", str(repo), "--image", str(x), "--prompt", "p", "--seed", "1", "--steps", "1",
          "--output", str(tmp_path / "o.png")])
    rec = read_png(tmp_path / "o.png")
    assert rec["inputs"]["image"][0]["file"] == "in.png" and len(rec["inputs"]["image"][0]["sha256"]) == 16
    assert rec["settings"]["strength"] == 0.6
    from minidit.pipeline import Pipeline
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded before the error"))
    for argv, message in [(["generate", "--from-png", tmp_path / "o.png"], "made by `minidit img2img`"),
                          (["img2img", "--from-png", tmp_path / "o.png", "--output", tmp_path / "o.png"],
                           "would overwrite"),
                          (["generate", "--from-png", x], "no minidit metadata")]:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert message in str(e.value)
    Image.new("RGB", (16, 16), "blue").save(x)  # the input changed since: the re-run could not match
    with pytest.raises(SystemExit, match="has changed"):
        main(["img2img", "--from-png", str(tmp_path / "o.png"), "--weights", str(repo), "--output", str(tmp_path / "p.png")])


# ---- seeds and prompts --------------------------------------------------------------------------------------

def test_prompts_and_seeds_one_run(repo, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a blue ball\n\na green tree\n")
    main(["generate", "--weights", str(repo), "--prompt", "a cat", "--prompt-file", str(tmp_path / "prompts.txt"),
          "--seed", "1", "10", *FAST, "--output", str(tmp_path / "o.png")])
    got = [(r["prompt"], r["seed"]) for r in (read_png(tmp_path / f"o-{i}.png") for i in range(6))]
    assert got == [(p, s) for p in ("a cat", "a blue ball", "a green tree") for s in (1, 10)]
    assert capsys.readouterr().err.count("loading ") == 1  # the model is loaded once


def test_missing_seed_is_random_printed_and_recorded(repo, tmp_path, capsys):
    main(["generate", "--weights", str(repo), "--prompt", "x", *FAST, "--output", str(tmp_path / "o.png")])
    seed = read_png(tmp_path / "o.png")["seed"]
    assert f"seed {seed} (random" in capsys.readouterr().err and 0 <= seed < 2 ** 32


# ---- helps ----------------------------------------------------------------------------------------------------

def test_every_option_states_its_default_and_every_command_has_examples():
    subcommands = build_parser().subcommands
    for name, p in subcommands.items():
        for a in p.options:
            if a.option_strings and a.dest != "help":
                text = a.help or ""
                assert "default" in text or "required" in text, (name, a.option_strings, text)
                assert text.count("required") <= 1, (name, a.option_strings, text)
        assert p.epilog.startswith("examples:\n  minidit " + name), name
    r = cli("outpaint", "--help")
    assert r.returncode == 0 and "--width" in r.stdout and "--canvas WxH" in r.stdout and "examples:" in r.stdout
    pers, free = (subcommands[c].format_help() for c in ("personalize", "freecus"))
    assert "freecus's default is the full prompt" in " ".join(pers.split())
    assert "personalize's default is empty" in " ".join(free.split())


def test_outpaint_canvas_options(tmp_path, monkeypatch):
    from minidit.pipeline import Pipeline
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded before the error"))
    x = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(x)
    base = ["outpaint", "--image", str(x), "--prompt", "p", "--output", str(tmp_path / "o.png")]
    for extra, message in [([], "--width W --height H"), (["--width", "32", "--height", "32", "--canvas", "32x32"],
                                                            "not both")]:
        with pytest.raises(SystemExit, match=message):
            main(base + extra)


# ---- weights from separate files ------------------------------------------------------------------------------

def test_separate_component_files_assemble_the_same_pipeline(repo, tmp_path):
    main(["generate", "--weights", str(repo), "--prompt", "a cat", "--seed", "2", *FAST, "--output", str(tmp_path / "a.png")])
    main(["generate", "--transformer", str(repo / "flux1-dev.safetensors"), "--ae", str(repo / "ae.safetensors"),
          "--t5", str(repo / "text_encoder_2"), "--clip", str(repo / "text_encoder"),
          "--t5-tokenizer", str(repo / "tokenizer_2"), "--prompt", "a cat", "--seed", "2", *FAST,
          "--output", str(tmp_path / "b.png")])  # the CLIP vocabulary: the one shipped with minidit
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


def test_weights_messages_say_what_is_missing(repo, tmp_path):
    r = cli("generate", "--prompt", "x", "--transformer", repo / "flux1-dev.safetensors", "--output", tmp_path / "o.png")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "still missing: --ae" in r.stderr and "--t5 " in r.stderr and "--clip " in r.stderr
    assert "--t5-tokenizer" in r.stderr and "--transformer (" not in r.stderr
    with pytest.raises(SystemExit, match="is a single file.*--transformer FILE"):
        main(["generate", "--prompt", "x", "--weights", str(repo / "flux1-dev.safetensors"),
              "--output", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()


# ---- what the run prints -----------------------------------------------------------------------------------

def test_plain_progress_loading_and_closing_lines_warnings_and_quiet(repo, tmp_path):
    long = " ".join(["word"] * 100)  # > 77 CLIP tokens: truncated, with a warning
    r = cli("generate", "--weights", repo, "--prompt", long, "--seed", "1", *FAST, "--output", tmp_path / "o.png")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "\r" not in err and "denoise 1/1" in err  # not a terminal: plain lines
    assert "loading transformer" in err and " GB" in err and "text_encoder_2" in err
    assert "done in " in err and str(tmp_path / "o.png") in err.splitlines()[-1]
    warns = [line for line in err.splitlines() if "token" in line]
    assert len(warns) == 1 and warns[0].startswith("warning: ") and "warnings.warn" not in err, err
    r = cli("generate", "--weights", repo, "--prompt", "x", "--seed", "1", *FAST, "--quiet", "--output", tmp_path / "q.png")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "" and (tmp_path / "q.png").exists()
    assert json.loads(Image.open(tmp_path / "q.png").text["minidit"])["seed"] == 1


def test_minidit_eval_is_the_harness(capsys):
    """`minidit eval ...` hands its options to the harness's own parser (python -m minidit.eval)."""
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: minidit eval") and "--metric-dino" in out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--world"])
    assert "--out" in capsys.readouterr().err
