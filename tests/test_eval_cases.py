"""Evaluation cases and method rows: the DreamBench layout as the papers use it, the methods grid, and bad inputs
as one-line errors before any model loads, with nothing written."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from minidit.eval.cases import make_cases, parse_prompts_and_classes, read_dreambench, with_captions, with_masks
from minidit.eval.command import main
from minidit.eval.methods import parse_methods
from minidit.eval.report import stats
from minidit.weights.tiny_metrics import write_tiny_dino

from conftest import SHARED

DREAMBENCH = SHARED / "dreambench"


def test_dreambench_is_the_papers_750_cases():
    subjects, templates = read_dreambench(DREAMBENCH)
    assert len(subjects) == 30 and len(templates["object"]) == len(templates["live"]) == 25
    live = sorted(s.name for s in subjects if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    cases = make_cases(subjects, templates)
    assert len(cases) == 750
    by = {(c.subject.name, c.prompt_index): c.prompt for c in cases}
    assert by[("dog", 0)] == "a dog in the jungle"
    assert by[("dog", 14)] == "a dog in a chef outfit"                      # a live prompt
    assert by[("bear_plushie", 14)] == "a stuffed animal floating in an ocean of milk"
    assert by[("teapot", 24)] == "a cube shaped teapot"
    assert make_cases(subjects, templates, unique_token="sks")[0].prompt == "a sks backpack in the jungle"
    assert [c.index for c in make_cases(subjects, templates, limit=3)] == [0, 1, 2]
    assert subjects[0].reference.endswith("backpack/00.jpg") and subjects[0].subject_caption == "a backpack"


def test_prompt_file_needs_both_sections():
    text = (DREAMBENCH / "prompts_and_classes.txt").read_text()
    with pytest.raises(ValueError, match="no live prompts"):
        parse_prompts_and_classes(text.split("Live Subject Prompts")[0], "f.txt")


def test_masks_and_captions(tmp_path):
    subjects, _ = read_dreambench(DREAMBENCH, ["dog", "can"])
    Image.new("L", (512, 512), 255).save(tmp_path / "dog.png")
    (tmp_path / "can").mkdir()
    Image.new("L", (512, 512), 255).save(tmp_path / "can" / "00.png")
    got = with_masks(subjects, tmp_path)
    assert got[0].mask == str(tmp_path / "dog.png") and got[1].mask == str(tmp_path / "can" / "00.png")
    assert with_masks(subjects, box=(0, 0, 256, 256))[0].mask_record == "0,0,256,256"
    (tmp_path / "c.json").write_text(json.dumps({"dog": "a corgi with a red collar"}))
    got = with_captions(subjects, tmp_path / "c.json")
    assert [s.subject_caption for s in got] == ["a corgi with a red collar", "a can"]
    (tmp_path / "c.txt").write_text("can: a blue soda can\n")
    assert with_captions(subjects, tmp_path / "c.txt")[1].subject_caption == "a blue soda can"


def test_method_rows():
    rows = parse_methods("plain,personalize:paper+tau=0.6|0.8,freecus:official+no-ans,freecus+lambda=1,"
                         "freecus:paper+no-caption,freecus+vital_layers=0,1,2")
    assert [r.label for r in rows] == ["plain", "personalize:paper+tau=0.6", "personalize:paper+tau=0.8",
                                       "freecus:official+no-ans", "freecus:paper+lambda=1",
                                       "freecus:paper+no-caption", "freecus:paper+vital_layers=0,1,2"]
    assert rows[1].settings().tau == 0.6 and rows[2].settings().perturb is True
    assert rows[3].settings().mu_shift_type == "target" and rows[3].settings().mask_rule == "bilinear"
    assert rows[4].settings().lambda_ref == rows[4].settings().lambda_prompt == 1.0
    assert rows[5].caption is False and rows[5].record()["caption"] is False
    assert rows[6].settings().vital_layers == (0, 1, 2)
    assert len({r.tag for r in rows}) == len(rows)
    # which rows share their reference branch across prompts (refcache.py): PA always, FreeCus with ref-caption
    assert [r.shares for r in rows] == [False, True, True, False, False, False, False]
    (rc,) = parse_methods("freecus+ref-caption+no-caption")
    assert rc.shares and rc.uses_caption and not rc.caption and rc.record()["ref_caption"] is True


def _dreambench_copy(tmp_path, subjects=("dog", "can")):
    root = tmp_path / "db"
    root.mkdir()
    text = (DREAMBENCH / "prompts_and_classes.txt").read_text()
    (root / "prompts_and_classes.txt").write_text(text)
    for s in subjects:
        shutil.copytree(DREAMBENCH / s, root / s)
    return root


def _error(args, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "plain,dreambooth"], "unknown method 'dreambooth'"),
    (["--methods", "personalize:paper+tau=1.5"], "tau must be in [0, 1]"),
    (["--methods", "freecus+lambda_reff=1"], "no field 'lambda_reff'"),
    (["--methods", "plain+tau=0.5"], "plain generation takes no preset"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--height", "100", "--width", "96"], "--height must be a positive multiple of 16"),
    (["--box", "0,0,600,10"], "leaves the 512x512 reference"),
    (["--cache-gb", "-1"], "--cache-gb must be a finite number >= 0"),
    (["--cache-gb", "nan"], "--cache-gb must be a finite number >= 0"),
    (["--methods", "personalize+ref-caption"], "unknown setting 'ref-caption'"),
])
def test_bad_options_are_one_line_errors(tmp_path, extra, needle):
    out = tmp_path / "out"
    msg = _error(["--dreambench", str(DREAMBENCH), "--subjects", "dog", "--out", str(out), *extra])
    assert needle in msg
    assert not out.exists()


def test_bad_inputs_are_one_line_errors(tmp_path):
    out = tmp_path / "out"
    root = _dreambench_copy(tmp_path)
    # a subject listed in prompts_and_classes.txt without its folder
    msg = _error(["--dreambench", str(root), "--out", str(out)])
    assert "the subject folder 'backpack' listed in prompts_and_classes.txt is missing" in msg
    # a mask of another size than its reference
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((256, 512), 255, np.uint8)).save(masks / "dog.png")
    msg = _error(["--dreambench", str(root), "--subjects", "dog", "--masks", str(masks), "--out", str(out)])
    assert "512x256, but the reference" in msg and "is 512x512" in msg
    # a metric checkpoint of the wrong kind
    dino = write_tiny_dino(tmp_path / "dino")
    msg = _error(["--dreambench", str(root), "--subjects", "dog", "--metric-clip", str(dino), "--out", str(out)])
    assert "--metric-clip" in msg and "a 'vit' checkpoint, not 'clip'" in msg
    # unknown captions subject, an unreadable OUT
    (tmp_path / "c.json").write_text('{"cat": "x"}')
    assert "unknown subject(s) cat" in _error(["--dreambench", str(root), "--subjects", "dog", "--captions",
                                               str(tmp_path / "c.json"), "--out", str(out)])
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _error(["--dreambench", str(root), "--subjects", "dog", "--out", str(out)])
    assert "not empty and not an evaluation folder" in msg and (out / "keep.txt").read_text() == "mine"


def test_interval_is_the_normal_approximation():
    s = stats([0.0, 1.0, 2.0, 3.0])
    half = 1.959963984540054 * (5 / 3) ** 0.5 / 2  # z · s / √n, s² = 5/3
    assert s["mean"] == 1.5 and s["count"] == 4
    assert abs(s["ci95"][0] - (1.5 - half)) < 1e-12 and abs(s["ci95"][1] - (1.5 + half)) < 1e-12
    assert stats([0.7])["ci95"] is None


def test_a_longer_limit_resumes_the_same_out(tmp_path):
    """--limit is not part of a run's identity: a quick run's OUT grows into the full run; other options are."""
    from minidit.eval.command import build_parser, make_plan
    from minidit.eval.runner import prepare_out
    out = tmp_path / "out"
    base = ["--dreambench", str(DREAMBENCH), "--subjects", "dog,can", "--out", str(out)]
    prepare_out(make_plan(build_parser().parse_args(base + ["--limit", "2"])))
    assert (out / "run.json").is_file()
    plan = make_plan(build_parser().parse_args(base))  # no error: the same run, all 50 cases
    assert len(plan.cases) == 50
    assert "seeds" in _error(base + ["--seeds", "1"])
