"""`semlens feedback` end to end on a tiny user model and a tiny Broden-format dataset."""

from __future__ import annotations

import csv
import sys
import textwrap

import pytest
import torch
from torch import nn

from semlens.checkpoint import load_state_dict, save_weights
from semlens.world import write_concepts

USERMOD = textwrap.dedent(
    """
    import torch.nn as nn
    def make():
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12))
    """
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fb")
    (d / "fbmodel_semlens.py").write_text(USERMOD)
    sys.path.insert(0, str(d))
    import fbmodel_semlens

    torch.manual_seed(0)
    save_weights(fbmodel_semlens.make(), d / "model.safetensors")
    write_concepts(d / "data", n=24, size=32, seed=1, workers=1)
    with open(d / "units.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "unit", "concept", "category", "iou", "threshold"])
        w.writerow(["2", 3, "red", "color", 0.3, 0.1])
        w.writerow(["2", 5, "circle", "object", 0.2, 0.1])
    return d


class _Result:
    def __init__(self, res):
        self.returncode = res.exit_code
        self.stdout = self.stderr = res.output


def _run(workdir, *args):
    from typer.testing import CliRunner

    from semlens.cli.main import app

    res = CliRunner().invoke(app, ["feedback", *args, "--project", str(workdir)],
                             env={"SEMLENS_PROGRESS": "0", "COLUMNS": "200"})
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return _Result(res)


def test_feedback_round_trip(workdir):
    r = _run(workdir, "init", "--model", "fbmodel_semlens:make", "--weights", str(workdir / "model.safetensors"),
             "--data", str(workdir / "data"), "--names", str(workdir / "units.csv"), "--layer", "2")
    assert r.returncode == 0, r.stderr
    r = _run(workdir, "add", "000000", "--missing", "red", "--author", "ana", "--preview")
    assert r.returncode == 0, r.stderr
    assert "units named 'red': 2:3" in r.stdout and "prediction now" in r.stdout
    bad = _run(workdir, "add", "999999", "--missing", "red")
    assert bad.returncode == 2 and "unknown sample id" in bad.stderr
    bad = _run(workdir, "add", "000000", "--missing", "rde")
    assert bad.returncode == 2 and "Did you mean: red" in bad.stderr
    bad = _run(workdir, "add", "000000", "--missing", "blue")
    assert bad.returncode == 2 and "no unit of layer '2' is a detector" in bad.stderr
    r = _run(workdir, "apply", "--steps", "5", "--mu", "0.01")
    assert r.returncode == 0, r.stderr
    assert "version 2 (parent 1)" in r.stdout
    r = _run(workdir, "list")
    assert "applied" in r.stdout and "ana" in r.stdout
    store = workdir / ".semlens" / "versions"
    v1, v2 = load_state_dict(store / "v00001.safetensors"), load_state_dict(store / "v00002.safetensors")
    assert not torch.equal(v1["2.weight"], v2["2.weight"]) and torch.equal(v1["6.weight"], v2["6.weight"])
    r = _run(workdir, "undo")
    assert r.returncode == 0 and "current version is now 1" in r.stdout
    r = _run(workdir, "versions")
    assert "undone" in r.stdout


def test_feedback_reads_stored_artefacts_and_refuses_another_models_names(workdir, tmp_path, monkeypatch):
    import fbmodel_semlens

    from semlens.correct.project import CorrectionProject
    from semlens.units.names import UnitNames

    proj = tmp_path / "p"
    r = _run(proj, "init", "--model", "fbmodel_semlens:make", "--weights", str(workdir / "model.safetensors"),
             "--data", str(workdir / "data"), "--names", str(workdir / "units.csv"), "--layer", "2")
    assert r.returncode == 0, r.stderr
    p = CorrectionProject(proj)
    base = p.store.current_version()
    names_path, refs_path = p.artefact_paths(base)
    assert UnitNames.load(names_path, "2").units.tolist() == [3, 5]
    # a remark and a correction never recompute the references over the training split
    monkeypatch.setattr("semlens.correct.classifier.fit_references", lambda *a, **k: 1 / 0)
    assert _run(proj, "add", "000001", "--missing", "red").returncode == 0
    assert _run(proj, "apply", "--steps", "2").returncode == 0
    v2 = p.store.current_version()
    assert v2.id == 2 and v2.artefacts == base.artefacts == {"names": names_path.stem, "references": refs_path.stem}
    assert _run(proj, "versions").returncode == 0  # (its table lists these hashes; its width follows the terminal)
    # a changed artefact file is noticed
    refs_path.write_bytes(refs_path.read_bytes() + b" ")
    bad = _run(proj, "add", "000001", "--missing", "red", "--preview")  # (without --preview the remark is stored:
    assert bad.returncode == 2 and "references file of model version 2" in bad.stderr  # it needs no artefact)
    bad = _run(proj, "apply", "--steps", "2")
    assert bad.returncode == 2 and "references file of model version 2" in bad.stderr
    # names stored for another model are refused at init, in one line
    other = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 9, 3, padding=1))
    from semlens.artefacts import model_signature

    UnitNames("2", torch.tensor([3]), ("red",), torch.tensor([0.3]), model_signature(other)).save(
        tmp_path / "other.safetensors")
    bad = _run(tmp_path / "q", "init", "--model", "fbmodel_semlens:make", "--weights",
               str(workdir / "model.safetensors"), "--data", str(workdir / "data"), "--names",
               str(tmp_path / "other.safetensors"), "--layer", "2")
    assert bad.returncode == 2 and "made for another model" in bad.stderr and bad.stderr.count("\n") <= 2
    assert fbmodel_semlens.make  # the user model module stays importable


def test_add_records_a_remark_without_loading_the_model(workdir, tmp_path, monkeypatch):
    """`feedback add` checks the sample's file and the stored targets (.semlens/targets.json, written at init from
    the corrector itself) and never imports torch; a project without targets.json falls back to the corrector."""
    import json
    import subprocess

    from semlens.correct.project import CorrectionProject
    from semlens.correct.store import FeedbackStore

    proj = tmp_path / "p"
    r = _run(proj, "init", "--model", "fbmodel_semlens:make", "--weights", str(workdir / "model.safetensors"),
             "--data", str(workdir / "data"), "--names", str(workdir / "units.csv"), "--layer", "2")
    assert r.returncode == 0, r.stderr
    stored = json.loads((proj / ".semlens" / "targets.json").read_text())
    assert stored["kind"] == "missing_concept" and "red" in stored["targets"]
    assert stored["targets"] == CorrectionProject(proj).corrector().targets()
    code = ("import runpy, sys\n"
            f"sys.argv = ['semlens', 'feedback', 'add', '000001', '--missing', 'red', '-p', {str(proj)!r}]\n"
            "try:\n    runpy.run_module('semlens', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir,
                         env={**__import__("os").environ, "SEMLENS_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr
    assert "remark 1 stored (against version 1)" in out.stdout and "torch imported: False" in out.stdout
    assert [(r.sample_id, r.kind, r.target) for r in FeedbackStore(proj).remarks()] == [
        ("000001", "missing_concept", "red")]
    # what the file test or the stored targets cannot vouch for goes through the corrector's checks and errors
    for sample, target, message in (("999999", "red", "unknown sample id"), ("../000001", "red", "unknown sample id"),
                                    ("000001", "rde", "Did you mean: red")):
        bad = _run(proj, "add", sample, "--missing", target)
        assert bad.returncode == 2 and message in bad.stderr
    (proj / ".semlens" / "targets.json").unlink()  # a project made before targets.json existed
    assert _run(proj, "add", "000002", "--missing", "red").returncode == 0
    assert json.loads((proj / ".semlens" / "targets.json").read_text()) == stored  # written again on the way
    assert len(FeedbackStore(proj).remarks()) == 2
    # a project whose targets.json cannot be written (read-only) still takes remarks, through the corrector
    (proj / ".semlens" / "targets.json").unlink()

    def read_only(self, corrector):
        raise PermissionError(13, "Permission denied", str(proj / ".semlens" / "targets.json"))

    monkeypatch.setattr(CorrectionProject, "write_targets", read_only)
    assert _run(proj, "add", "000003", "--missing", "red").returncode == 0
    assert len(FeedbackStore(proj).remarks()) == 3 and not (proj / ".semlens" / "targets.json").exists()
