"""train_tiny never destroys what it did not make (issue 24 class 8): --out may not be the work folder, hold it,
sit among its files or replace a folder it did not write; every argument is range-checked before anything is
written; an export is written beside `out` and renamed into place; a failed --init-from leaves the work folder
as it was; failures are one `error:` line. And the exporter writes the minidit.json the built-in model ships."""
import json

import pytest

import minidit.weights.train_tiny as T
from conftest import ROOT


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        T.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err, err
    return err


@pytest.mark.parametrize("out, message", [
    ("{w}", "is (or holds) the work folder"), ("{t}", "is (or holds) the work folder"),
    ("{w}/repo", "inside the work folder"), ("{t}/mine", "not an earlier export")])
def test_out_never_replaces_what_the_script_did_not_make(tmp_path, capsys, out, message):
    work, mine = tmp_path / "w", tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    argv = ["--work", str(work), "--out", out.format(w=work, t=tmp_path)]
    assert message in refused(argv, capsys)
    assert not work.exists() and (mine / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "--images must be >= 1"), (["--batch", "0"], "--batch must be >= 1"),
    (["--seed", "-3"], "--seed must be >= 0"), (["--dit-steps", "0"], "--dit-steps"),
    (["--stop-at", "0"], "--stop-at"), (["--dit-minutes", "nan"], "--dit-minutes"),
    (["--threads", "-1"], "--threads"), (["--tune-text-lr", "inf"], "--tune-text-lr")])
def test_every_argument_is_range_checked_before_anything_is_written(tmp_path, capsys, argv, message):
    assert message in refused(["--work", str(tmp_path / "w"), *argv], capsys)
    assert not (tmp_path / "w").exists()


def test_export_is_renamed_into_place_and_a_failure_keeps_the_earlier_one(tmp_path, monkeypatch):
    out = tmp_path / "repo-final"
    out.mkdir()
    (out / "model_index.json").write_text("{}")  # an earlier export

    def broken(work, repo, tmp):
        (tmp / "half.safetensors").write_bytes(b"x")
        raise OSError("disk full")
    monkeypatch.setattr(T, "write_export", broken)
    with pytest.raises(OSError, match="disk full"):
        T.stage_export(tmp_path / "w", tmp_path / "repo", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo-final"]  # no half-made folder beside it
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]

    def fine(work, repo, tmp):
        (tmp / "model_index.json").write_text('{"new": 1}')
    monkeypatch.setattr(T, "write_export", fine)
    T.stage_export(tmp_path / "w", tmp_path / "repo", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo-final"]
    assert json.loads((out / "model_index.json").read_text()) == {"new": 1}


def test_a_failed_init_from_leaves_nothing_and_is_one_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    monkeypatch.setattr(T, "init_problem", lambda work, src: None)  # the checks pass, the copy then fails

    def broken(work, src):
        (work / "repo").mkdir()
        (work / "repo" / "part.safetensors").write_bytes(b"x")
        raise RuntimeError("corrupt tensor data in flux1-schnell.safetensors")
    monkeypatch.setattr(T, "stage_init", broken)
    work = tmp_path / "w"
    with pytest.raises(SystemExit, match="^error: RuntimeError: corrupt tensor data"):
        T.main(["--work", str(work), "--init-from", str(src)])
    assert list(work.iterdir()) == []


def test_the_exporter_writes_the_minidit_json_the_built_in_model_ships():
    assert json.loads((ROOT / "weights" / "trained" / "minidit.json").read_text()) == T.DEFAULTS
