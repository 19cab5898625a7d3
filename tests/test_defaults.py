"""Model-aware defaults (issue 25 items 1 and 2): a model's recommended size, steps, guidance and true CFG come
from its folder's minidit.json (untrusted input), and every entry point and the CLI take their defaults from
there; commands with an input image draw at the model's size. Also the API's argument types (issue 24 class 7)."""
import json
import os
import re
import warnings
from dataclasses import replace

import pytest
import torch
from PIL import Image

from conftest import ROOT
from minidit import Pipeline, Reference
from minidit.defaults import FILE, ModelDefaults
from minidit.repository import builtin_repo

PROMPT = "a large red striped circle in the centre, on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(device="cpu")


def photo(path, size):
    Image.new("RGB", size, (200, 40, 40)).save(path)
    return path


def test_builtin_model_states_its_defaults_and_flux_keeps_diffusers():
    d = ModelDefaults.read(builtin_repo())
    assert (d.height, d.width, d.steps, d.true_cfg_scale, d.negative_prompt) == (256, 256, 28, 4.0, "")
    flux = ModelDefaults.read(ROOT / "weights")  # a folder without minidit.json: FluxPipeline's defaults
    assert (flux.height, flux.width, flux.steps, flux.guidance, flux.true_cfg_scale, flux.negative_prompt) == \
        (None, None, None, 3.5, 1.0, None)
    assert flux.size(None, None) == (1024, 1024) and flux.size(None, 512, own=(None, None)) == (None, 512)
    assert flux.size_warning(64, 64) is None  # FLUX.1 states no training range: no guess, no warning


@pytest.mark.parametrize("text, key", [
    ('[256]', "JSON object"), ('{"height": "256"}', "height"), ('{"height": 100}', "height"),
    ('{"steps": 0}', "steps"), ('{"steps": 2.5}', "steps"), ('{"guidance": NaN}', "guidance"),
    ('{"true_cfg_scale": 4}', "negative_prompt"), ('{"colour": 1}', "unknown key"),
    ('{"width": 1e400}', "width"), ('{"trained_pixels": [5]}', "trained_pixels"),
    ('{"negative_prompt": 3}', "negative_prompt"), ("[" * 20000, "JSON"), ('{"height": 256', "JSON"),
    ('{"steps": 99999999999999999999999}', "steps")], ids=lambda v: str(v)[:24])
def test_a_bad_minidit_json_is_one_named_error(tmp_path, text, key):
    (tmp_path / FILE).write_text(text)
    with pytest.raises((ValueError, TypeError)) as e:
        ModelDefaults.read(tmp_path)
    msg = str(e.value)
    assert FILE in msg and key in msg and "\n" not in msg, msg


def test_minidit_json_must_be_a_small_regular_file(tmp_path):
    os.mkfifo(tmp_path / FILE)  # would hang a plain open()
    with pytest.raises(ValueError, match="not a regular file"):
        ModelDefaults.read(tmp_path)
    os.remove(tmp_path / FILE)
    (tmp_path / FILE).write_text(" " * (1 << 20) + "{}")
    with pytest.raises(ValueError, match="bytes"):
        ModelDefaults.read(tmp_path)


def test_api_defaults_are_the_models(pipe):
    """generate and the diffusers-shaped call draw at the model's 256 x 256 with its true CFG 4 (the issue: 1024 x
    1024 without CFG), exactly as when the values are given."""
    assert pipe.defaults == ModelDefaults.read(builtin_repo()) and pipe.default_steps == 28
    (image,) = pipe.generate(PROMPT, seed=1, steps=2)
    assert image.size == (256, 256)
    explicit = pipe.generate(PROMPT, height=256, width=256, steps=2, seed=1, true_cfg_scale=4.0, negative_prompt="",
                             return_latents=True)
    assert torch.equal(pipe.generate(PROMPT, seed=1, steps=2, return_latents=True), explicit)
    assert not torch.equal(pipe.generate(PROMPT, seed=1, steps=2, true_cfg_scale=1, return_latents=True), explicit)
    called = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="latent")
    assert torch.equal(called.images, explicit)


def test_input_image_commands_draw_at_the_models_size(pipe, tmp_path):
    """img2img, personalize and freecus with a 512 px photo draw 256 x 256 (the input resized), and a size far from
    the 256 x 256 the model was trained at warns; a 100 px photo is a valid img2img input."""
    big = photo(tmp_path / "big.png", (512, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own size: no warning
        assert pipe.img2img(big, "a red square", steps=1, strength=1.0)[0].size == (256, 256)
        assert pipe.img2img(photo(tmp_path / "small.png", (100, 100)), "x", steps=1)[0].size == (256, 256)
        ref = Reference(big, (128, 128, 256, 256))
        assert pipe.personalize("a red square", ref, steps=1)[0].size == (256, 256)
        assert pipe.freecus("a red square", ref, steps=1)[0].size == (256, 256)
    with pytest.warns(UserWarning, match="far from the size this model was trained at"):
        pipe.schedule(1, 512, 512)  # where every entry point passes with its final size


def test_personalize_with_gamma_1_prints_no_invert_lines(pipe, tmp_path, capfd):
    """γ = 1 inversion never calls the model: no `invert` progress lines (γ < 1 prints them: the check can fail)."""
    ref = Reference(photo(tmp_path / "r.png", (256, 256)), (64, 64, 128, 128))
    pipe.personalize("a red square", ref, steps=1, progress=True)
    assert "invert" not in capfd.readouterr().err
    pipe.personalize("a red square", ref, steps=1, progress=True, gamma=0.5)
    assert "invert" in capfd.readouterr().err


def test_readme_first_python_snippet_draws_the_first_commands_picture(tmp_path, monkeypatch):
    """The README's first drawing snippet and its first CLI command, with the snippet's seed, make the same pixels
    (both take their defaults from the model; its steps lowered to 3 for both, so the test takes seconds)."""
    from minidit.cli import main
    text = (ROOT / "README.md").read_text()
    command = re.search(r'^```bash\n.*?minidit generate --prompt "([^"]+)"', text, flags=re.S | re.M).group(1)
    snippet = next(b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if ".generate(" in b)
    seed = re.search(r"\.generate\([^)]*seed=(\d+)", snippet)
    assert f'"{command}"' in snippet and seed, "the snippet draws the first command's prompt with a fixed seed"
    read = ModelDefaults.read
    monkeypatch.setattr(ModelDefaults, "read", classmethod(lambda cls, root: replace(read(root), steps=3)))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        main(["generate", "--prompt", command, "--seed", seed.group(1), "--output", "cli.png", "--quiet"])
        before = set(tmp_path.iterdir())
        exec(compile(snippet, "README.md first drawing snippet", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)  # the CLI's CPU default is 1 thread and the snippet ran with it too: torch
        # sums in a thread-dependent order (2 vs 1 threads: at most 1/255 on 0.004 % of the pixels, measured)
    (saved,) = set(tmp_path.iterdir()) - before
    a, b = Image.open(tmp_path / "cli.png"), Image.open(saved)
    assert a.size == (256, 256) and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


# -- issue 24 class 7: the API's argument types -------------------------------------------------------------

def test_prompts_of_the_wrong_type_name_the_argument(pipe):
    for bad in (None, 3, [], ["ok", None]):
        with pytest.raises(TypeError, match="^prompt"):
            pipe.generate(bad, steps=1)
    with pytest.raises(TypeError, match="^negative_prompt"):
        pipe.generate("x", negative_prompt=5, true_cfg_scale=2, steps=1)
    with pytest.raises(TypeError, match="^prompt"):
        pipe.personalize(None, Reference(torch.zeros(3, 32, 32)), steps=1)


def test_image_tensors_outside_minus_one_one_meta_tensors_and_fractional_boxes_are_refused(pipe):
    """The documented rule (validate.pixels): refuse, never guess — uint8, 0..255 floats, slightly-out values."""
    box = (0, 0, 32, 32)
    for bad, what in ((torch.full((3, 64, 64), 200, dtype=torch.uint8), "uint8"),
                      (torch.full((3, 64, 64), 200.0), r"\[-1, 1\]"), (torch.full((3, 64, 64), 1.01), r"\[-1, 1\]"),
                      (torch.zeros(3, 64, 64, device="meta"), "meta")):
        with pytest.raises((TypeError, ValueError), match=what):
            pipe.inpaint(bad, box, "x", steps=1)
        with pytest.raises((TypeError, ValueError), match=what):
            pipe.personalize("x", Reference(bad), steps=1)
    with pytest.raises((TypeError, ValueError), match="box"):
        pipe.inpaint(torch.zeros(3, 64, 64), (0, 0, 32.5, 32), "x", steps=1)
    with pytest.raises(ValueError, match="latents.*meta"):
        pipe.generate("x", steps=1, latents=torch.zeros(1, 256, 64, device="meta"))
