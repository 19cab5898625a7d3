"""Issue 13: nothing lost, nothing silently wrong, nothing read from outside. One block per class of bad input;
every CLI case checks the error comes before any model loads (Pipeline.load is replaced by a tripwire)."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT
from minidit import validate
from minidit.cli import main
from minidit.cli.record import save_images
from minidit.image import load_image, load_mask, output_paths, save_png
from minidit.loading import CheckpointError, check_config, find_safetensors, load_streaming, open_checkpoint
from minidit.weights.tiny import write_tiny_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("safety") / "FLUX.1-dev", "dev", seed=5)


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the error must come first."""
    from minidit.pipeline import Pipeline

    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(Pipeline, "load", tripwire)


def cli_error(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert e.value.code != 0 and "\n" not in msg.strip() and "Traceback" not in msg
    return msg


def gen(tmp_path, *extra):
    return ["generate", "--prompt", "x", "--output", str(tmp_path / "o.png"), *extra]


# ---- atomic output and output paths -----------------------------------------------------------------------

def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "o.png"
    save_png(Image.new("RGB", (16, 16), "red"), out)
    before = out.read_bytes()

    def dies(self, fp, *a, **k):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_png(Image.new("RGB", (16, 16), "blue"), out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["o.png"]


def test_concurrent_writers_leave_one_whole_image(tmp_path):
    out = tmp_path / "o.png"
    imgs = [Image.new("RGB", (256, 256), c) for c in ("red", "blue")] * 4
    threads = [threading.Thread(target=save_png, args=(im, out)) for im in imgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Image.open(out).getpixel((0, 0)) in ((255, 0, 0), (0, 0, 255)) and os.listdir(tmp_path) == ["o.png"]


def test_output_path_decisions(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "target.png").write_text("precious")
    (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    (tmp_path / "s-1.png").symlink_to(tmp_path / "target.png")  # the second of two numbered outputs
    os.mkfifo(tmp_path / "fifo.png")
    for bad, msg in [(tmp_path / "file" / "o.png", "not a directory"), (tmp_path / "link.png", "not a regular file"),
                     (tmp_path / "fifo.png", "not a regular file"), ("/dev/null", "not a regular file"),
                     (tmp_path / "s.png", "symbolic link"), (tmp_path / "o.jpg", "must be a .png")]:
        with pytest.raises(ValueError, match=msg):
            output_paths(bad, 2)
    assert output_paths(tmp_path / "pic", 2) == [tmp_path / "pic-0.png", tmp_path / "pic-1.png"]
    assert output_paths(str(tmp_path / "new") + "/", 3) == tmp_path / "new"  # dir/: numbered names inside
    assert output_paths(tmp_path, 1) == tmp_path                              # an existing directory too
    assert (tmp_path / "target.png").read_text() == "precious"


def test_directory_output_numbers_and_never_overwrites(tmp_path):
    pipe = SimpleNamespace(default_steps=4, variant="dev", name="tiny")
    args = SimpleNamespace(output=str(tmp_path / "out") + "/", prompt="x", seed=0, steps=None, guidance=3.5)
    imgs = [Image.new("RGB", (16, 16), c) for c in ("red", "green")]
    first = save_images(imgs, args, pipe, "generate")
    second = save_images(imgs[:1], args, pipe, "generate")
    assert [p.name for p in first + second] == ["generate-0000.png", "generate-0001.png", "generate-0002.png"]


def test_batch_failure_says_what_was_written(tmp_path, monkeypatch):
    pipe = SimpleNamespace(default_steps=4, variant="dev", name="tiny")
    args = SimpleNamespace(output=str(tmp_path / "o.png"), prompt="x", seed=0, steps=None, guidance=3.5)
    from minidit.cli import record
    real, calls = record.save_png, []

    def second_fails(img, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(img, path, *a, **k)
    monkeypatch.setattr(record, "save_png", second_fails)
    with pytest.raises(OSError, match=r"image 2 of 2 .*No space left.*written before: .*o-0.png"):
        save_images([Image.new("RGB", (16, 16))] * 2, args, pipe, "generate")
    assert sorted(os.listdir(tmp_path)) == ["o-0.png"]


def test_cli_checks_the_output_before_loading(tmp_path, no_load):
    (tmp_path / "f").write_text("x")
    assert "not a directory" in cli_error(["generate", "--prompt", "x", "--output", str(tmp_path / "f" / "o.png")])


# ---- non-finite values and ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,msg", [
    (["--height", "0"], "--height must be >= 16"),
    (["--width", "100000"], "--width must be <= 16384"),
    (["--seed", str(2 ** 64)], "--seed must be <= "),
    (["--seed", "-2"], "--seed must be >= 0 (or -1 for a random seed)"),
    (["--steps", "1000000"], "--steps must be <= 1000"),
    (["--guidance", "nan"], "--guidance is nan"),
    (["--guidance", "inf"], "--guidance is inf"),
    (["--num-images", "100000"], "--num-images must be <= "),
    (["--device", "cuda:99"] if torch.cuda.is_available() else ["--device", "cuda"], "cuda"),
    (["--device", "tpu"], "unknown device"),
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),
])
def test_cli_ranges_are_checked_before_loading(tmp_path, no_load, argv, msg):
    assert msg in cli_error(gen(tmp_path, *argv))


def test_resolution_that_cannot_fit_in_memory(monkeypatch):
    monkeypatch.setattr(validate, "_memory_bytes", lambda: 1 << 30)
    with pytest.raises(ValueError, match="more than this machine's memory"):
        validate.generate_args(16384, 16384, 4, 3.5, 0, 2)


@pytest.mark.parametrize("argv,msg", [
    (["freecus", "--lambda-ref", "nan"], "--lambda-ref is nan"),
    (["freecus", "--lambda-prompt", "0"], "--lambda-prompt must lie in (0"),
    (["freecus", "--vital-layers", ","], "--vital-layers is empty"),
    (["personalize", "--tau", "150"], "--tau must lie in [0"),
    (["personalize", "--offset", "-16,0", "--ref", "/nonexistent.png"], "not found: /nonexistent.png"),
])
def test_method_options_are_checked_before_loading(tmp_path, no_load, argv, msg):
    ref = tmp_path / "r.png"
    Image.new("RGB", (32, 32)).save(ref)
    cmd, *rest = argv
    extra = [] if "--ref" in rest else ["--ref", str(ref)]
    assert msg in cli_error([cmd, "--prompt", "x", "--output", str(tmp_path / "o.png"), *extra, *rest])


def test_api_ranges_and_types(repo):
    from minidit.pipeline import Pipeline
    pipe = Pipeline.load(repo, device="cpu")
    for kw, err, msg in [(dict(guidance=float("nan")), ValueError, "guidance is nan"),
                         (dict(seed=2 ** 64), ValueError, "seed must be <="), (dict(steps=2.5), TypeError, "steps"),
                         (dict(height=0), ValueError, "height must be >= 16")]:
        with pytest.raises(err, match=msg):
            pipe.generate("x", **{"height": 32, "width": 32, "steps": 1, **kw})
    with pytest.raises(ValueError, match="latents holds NaN"):
        pipe.decode(torch.full((1, 4, 64), float("nan")), 32, 32)


def test_method_api_checks_every_option_before_any_work(repo, monkeypatch):
    """The Python API of every method validates its options as the CLI does, before a model runs (nan, inf,
    out-of-range, floats for ints); FreeCus without a vital layer is an error, not plain generation."""
    from minidit.masks import Reference
    from minidit.pipeline import Pipeline
    pipe = Pipeline.load(repo, device="cpu")

    def tripwire(*a, **k):
        raise AssertionError("a model ran before the bad option was reported")
    monkeypatch.setattr(pipe, "use", tripwire)
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    ref = Reference(img, (0, 0, 16, 16))
    nan, inf = float("nan"), float("inf")
    cases = [
        (pipe.generate, ("x",), dict(true_cfg_scale=nan), "true_cfg_scale is nan"),
        (pipe.img2img, (img, "x"), dict(strength=nan), "strength is nan"),
        (pipe.img2img, (img, "x"), dict(guidance=inf), "guidance is inf"),
        (pipe.invert, (img,), dict(gamma=2.0), r"gamma must lie in \[0.0, 1.0\]"),
        (pipe.invert, (img,), dict(steps=0), "steps must be >= 1"),
        (pipe.personalize, ("x", ref), dict(guidance=nan), "guidance is nan"),
        (pipe.personalize, ("x", ref), dict(steps=10 ** 6), "steps must be <="),
        (pipe.personalize, ("x", ref), dict(seed=-1), "seed must be >= 0"),
        (pipe.personalize, ("x", ref), dict(num_images=0), "num_images must be >= 1"),
        (pipe.personalize, ("x", ref), dict(height=40, width=32), "multiples of 16"),
        (pipe.personalize, ("x", ref), dict(height=32), None),  # one side alone is range-checked too: fine
        (pipe.personalize, ("x", ref), dict(placement=(16.5, 0)), "x offset must be an integer"),
        (pipe.personalize, ("x", ref), dict(eta=inf), "eta must be in"),
        (pipe.personalize, ("x", ref), dict(vae_seed=-3), "seed must be >= 0"),
        (pipe.personalize, ("x", ref), dict(eta_decay_power=nan), "eta_decay_power is nan"),
        (pipe.inpaint, (img, (0, 0, 16, 16), "x"), dict(guidance=-1.0), "guidance must lie in"),
        (pipe.inpaint, (img, (0, 0, 16, 16), "x"), dict(steps=1.5), "steps must be an integer"),
        (pipe.outpaint, (img, "x", (0, 64)), {}, "canvas width must be >= 16"),
        (pipe.outpaint, (img, "x", (64.0, 64)), {}, "canvas width must be an integer"),
        (pipe.outpaint, (img, "x", (64, 64)), dict(offset=(nan, 0)), "offset x must be an integer"),
        (pipe.outpaint, (img, "x", (64, 64)), dict(seed=2 ** 64), "seed must be <="),
        (pipe.freecus, ("x", ref), dict(lambda_ref=nan), "lambda_ref is nan"),
        (pipe.freecus, ("x", ref), dict(lambda_prompt=0.0), r"lambda_prompt must lie in \(0.0"),
        (pipe.freecus, ("x", ref), dict(vital_layers=[]), "vital_layers is empty"),
        (pipe.freecus, ("x", ref), dict(ref_seed=-1), "seed must be >= 0"),
        (pipe.freecus, ("x", ref), dict(guidance=nan), "guidance is nan"),
        (pipe.freecus, ("x", ref), dict(ans_mu=inf), "ans_mu is inf"),
    ]
    for fn, args, kw, msg in cases:
        if msg is None:  # valid options: the first model use is reached
            with pytest.raises(AssertionError, match="a model ran"):
                fn(*args, **kw)
            continue
        with pytest.raises((ValueError, TypeError), match=msg):
            fn(*args, **kw)


def test_quantized_block_scales_are_not_weights(tmp_path):
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("this torch has no float8_e8m0fnu")
    sd = open_checkpoint(_tiny(tmp_path, {"weight": torch.ones(4, 3).to(torch.float8_e8m0fnu),
                                          "bias": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match="'weight' has dtype F8_E8M0: MX block scales"):
        sd.dtype("weight")


def test_non_finite_tensors_given_to_the_api():
    from minidit.masks import image_tensor
    with pytest.raises(ValueError, match="mask tensor holds NaN"):
        load_mask(torch.full((16, 16), float("nan")), (16, 16))
    with pytest.raises(ValueError, match="image tensor holds NaN"):
        image_tensor(torch.full((3, 16, 16), float("inf")))


# ---- checkpoints: finite, typed, contained, not memory-mapped ------------------------------------------------

def _tiny(tmp_path, tensors, name="m.safetensors"):
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


def test_nan_in_a_checkpoint_tensor_is_named(tmp_path):
    w = torch.randn(4, 3)
    w[1, 2] = float("nan")
    sd = open_checkpoint(_tiny(tmp_path, {"weight": w, "bias": torch.zeros(4)}))
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match="'weight' holds NaN or Inf"):
        load_streaming(lin, sd, what="ae.safetensors")
    big = _tiny(tmp_path, {"weight": torch.full((4, 3), 1e6), "bias": torch.zeros(4)}, "big.safetensors")
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match="after the cast to float16"):  # finite in fp32, inf in fp16
        load_streaming(lin, open_checkpoint(big), dtype=torch.float16)


def test_integer_tensor_where_a_float_belongs(tmp_path):
    sd = open_checkpoint(_tiny(tmp_path, {"weight": torch.ones(4, 3, dtype=torch.int32), "bias": torch.zeros(4)}))
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match="'weight' is int32 where the model has float32"):
        load_streaming(lin, sd)
    assert sd.dtype("weight") == torch.int32


def test_weights_do_not_change_when_the_file_is_rewritten(tmp_path, monkeypatch):
    path = _tiny(tmp_path, {"weight": torch.ones(256, 256), "bias": torch.zeros(256)})
    for keep, changes in (("0", False), ("1", True)):
        monkeypatch.setenv("MINIDIT_MMAP", keep)
        with torch.device("meta"):
            lin = torch.nn.Linear(256, 256)
        load_streaming(lin, open_checkpoint(path))
        save_file({"weight": torch.full((256, 256), 7.0), "bias": torch.zeros(256)}, str(tmp_path / "new"))
        with open(path, "r+b") as f:  # rewritten in place, as a careless copy over it would
            f.write((tmp_path / "new").read_bytes())
        assert bool((lin.weight == 7).all()) == changes
        save_file({"weight": torch.ones(256, 256), "bias": torch.zeros(256)}, str(path))


def test_shard_index_names_must_be_plain(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(1)}, str(outside))
    folder = tmp_path / "model"
    folder.mkdir()
    msgs = []
    for name in ("../outside.safetensors", str(outside), "sub/x.safetensors", "../nowhere.safetensors", ".."):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
        with pytest.raises(CheckpointError, match="not a plain file name") as e:
            find_safetensors(folder)
        msgs.append(str(e.value).replace(name, "NAME"))
    assert len(set(msgs)) == 1  # the same words whether the outside file exists or not
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        find_safetensors(folder)


def test_fifo_shard_is_refused_without_opening(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")  # opening it for reading would block forever
    code = ("import sys; from minidit.loading import open_checkpoint, CheckpointError\n"
            f"try: open_checkpoint({str(tmp_path)!r})\nexcept CheckpointError as e: print(e); sys.exit(3)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "not a regular file" in p.stdout


def test_hf_cache_ref_cannot_point_outside(tmp_path):
    from minidit.repository import resolve_weights
    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (tmp_path / "secret").mkdir()
    (repo / "refs" / "main").write_text("../../secret")
    with pytest.raises(CheckpointError, match="not a plain file name"):
        resolve_weights(repo)
    (repo / "refs" / "main").write_text("abc")
    assert resolve_weights(repo) == repo / "snapshots" / "abc"


def test_config_bounds_before_any_module_is_built(tmp_path, repo):
    from minidit.text_encoder import load_clip, load_t5
    t5 = tmp_path / "t5"
    shutil.copytree(repo / "text_encoder_2", t5)
    cfg = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**cfg, "num_layers": 10 ** 9}))
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_layers = 1000000000 is out of range"):
        load_t5(t5, device="cpu")
    (t5 / "config.json").write_text(json.dumps({**cfg, "num_layers": 1000}))
    with pytest.raises(CheckpointError, match="num_layers = 1000 but the checkpoint holds"):
        load_t5(t5, device="cpu")
    (t5 / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": float("nan")}))
    with pytest.raises(CheckpointError, match="eps = nan"):
        load_t5(t5, device="cpu")
    clip = tmp_path / "clip"
    shutil.copytree(repo / "text_encoder", clip)
    c = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({**c, "num_hidden_layers": 10 ** 6}))
    with pytest.raises(CheckpointError, match="num_layers = 1000000 but"):
        load_clip(clip, device="cpu")
    assert time.perf_counter() - t < 30
    from dataclasses import replace

    from minidit.autoencoder import AutoEncoderConfig
    with pytest.raises(CheckpointError, match="scale_factor = nan"):
        check_config(replace(AutoEncoderConfig.tiny(), scale_factor=float("nan")), "ae.safetensors")
    from minidit.tokenizer import T5Tokenizer
    tok = tmp_path / "tok"
    shutil.copytree(repo / "tokenizer_2", tok)
    (tok / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 10 ** 7}))
    with pytest.raises(ValueError, match="extra_ids = 10000000"):
        T5Tokenizer(tok)


# ---- images read exactly ------------------------------------------------------------------------------------

def test_sixteen_bit_masks_are_scaled_not_clipped(tmp_path):
    Image.new("I;16", (32, 16), 300).save(tmp_path / "m.png")
    assert float(load_mask(tmp_path / "m.png", (16, 32)).max()) == pytest.approx(300 / 65535)
    Image.new("I;16", (32, 16), 65535).save(tmp_path / "w.png")
    assert load_image(tmp_path / "w.png").getpixel((0, 0)) == (255, 255, 255)


def test_alpha_only_masks_and_ambiguous_ones(tmp_path):
    a = Image.new("LA", (32, 16), (0, 0))
    a.putpixel((3, 3), (0, 255))
    a.save(tmp_path / "a.png")
    m = load_mask(tmp_path / "a.png", (16, 32))
    assert float(m.sum()) == 1.0 and float(m[3, 3]) == 1.0
    rgba = Image.new("RGBA", (32, 16), (10, 20, 30, 0))
    rgba.putpixel((1, 1), (200, 0, 0, 255))
    rgba.save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="ambiguous"):
        load_mask(tmp_path / "b.png", (16, 32))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (32, 16))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (16, 32)


def test_bad_image_files_are_one_named_error(tmp_path, monkeypatch):
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, msg in (("text.png", "not an image file"), ("cut.png", "corrupt or truncated"), ("none.png", "not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=msg) as e:
            load_image(tmp_path / name)
        assert name in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(tmp_path / "ok.png")


# ---- errors a user can act on -----------------------------------------------------------------------------

def test_debug_shows_the_traceback(tmp_path, no_load):
    with pytest.raises(ValueError, match="guidance is nan"):
        main(gen(tmp_path, "--guidance", "nan", "--debug"))


def test_usage_errors_are_one_line_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--height", "abc"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "--height" in err


def test_negative_numbers_parse(tmp_path, monkeypatch):
    from minidit.cli import commands
    seen = {}
    monkeypatch.setitem(commands.COMMANDS, "outpaint", lambda a: seen.update(offset=a.offset))
    monkeypatch.setitem(commands.COMMANDS, "personalize", lambda a: seen.update(off=a.offset))
    main(["outpaint", "--prompt", "x", "--image", "i.png", "--canvas", "64x64", "--offset", "-16,0"])
    main(["personalize", "--prompt", "x", "--ref", "r.png", "--offset", "-16,-32", "--offset", "16,0"])
    assert seen == {"offset": "-16,0", "off": ["-16,-32", "16,0"]}


def test_unwritable_cache(tmp_path, monkeypatch):
    from minidit.weights.tiny import tiny_repo
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("MINIDIT_CACHE", str(tmp_path / "cachefile"))
    with pytest.raises(OSError, match="cannot write the built-in tiny checkpoint into .*set MINIDIT_CACHE"):
        tiny_repo()


def test_info_fails_on_incomplete_or_corrupt_folders(tmp_path, repo, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    main(["info", str(bad)])
    assert "complete: yes" in capsys.readouterr().out
    data = (bad / "ae.safetensors").read_bytes()
    (bad / "ae.safetensors").write_bytes(data[:-100])
    (bad / "tokenizer_2" / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(SystemExit) as e:
        main(["info", str(bad)])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "ae              UNREADABLE" in out and "tokenizer_config.json: not valid JSON" in out


def test_tiny_cache_cleans_stale_temp_and_repairs(tmp_path, monkeypatch):
    import minidit.weights.tiny as tiny
    monkeypatch.setenv("MINIDIT_CACHE", str(tmp_path))
    calls = []
    real = tiny.write_tiny_repo
    monkeypatch.setattr(tiny, "write_tiny_repo", lambda root, v: (calls.append(v), real(root, v))[1])
    stale = tmp_path / f".tiny-flux-dev-v{tiny.VERSION}-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 3600,) * 2)
    root = tiny.tiny_repo()
    assert not stale.exists() and len(calls) == 1
    assert tiny.tiny_repo() == root and len(calls) == 1      # intact: reused, not rewritten
    (root / "ae.safetensors").unlink()                        # damaged: rebuilt once
    assert tiny.tiny_repo() == root and (root / "ae.safetensors").is_file() and len(calls) == 2
    assert tiny.tiny_repo() == root and len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_readme_has_a_safety_section():
    assert "## Safety" in (ROOT / "README.md").read_text()


def test_sigterm_during_a_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "o.png"
    save_png(Image.new("RGB", (16, 16), "red"), out)
    before = out.read_bytes()
    child = f"""
import sys, time
from PIL import Image
from minidit import cli, image
from minidit.cli import commands
def slow_save(self, fp, *a, **k):
    fp.write(b"partial"); fp.flush(); print("writing", flush=True); time.sleep(60)
Image.Image.save = slow_save
commands.COMMANDS["info"] = lambda a: image.save_png(Image.new("RGB", (16, 16)), {str(out)!r})
cli.main(["info", "x"])
"""
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["o.png"]
