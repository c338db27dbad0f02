"""`soda audit` (issue 18): a folder of models with hostile files, the local and Ray backends, resume,
a worker killed mid-model, and verdicts identical to `soda detect`.

Everything runs on a tiny generated Fashion-MNIST (idx files) and untrained seeded models.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from soda_backdoor.audit import AUDIT_LOG, AuditConfig, audit_model, rows_html, run_audit, sort_rows
from soda_backdoor.cli.main import main
from soda_backdoor.detection import DetectionConfig
from soda_backdoor.models import ModelMeta, create_model, save_model
from soda_backdoor.zoo.build import read_jsonl
from helpers import write_fmnist_idx

torch.set_num_threads(1)

GOOD = {"cnn0.safetensors": ("cnn", 0), "cnn1.safetensors": ("cnn", 1), "sub/lenet2.safetensors": ("lenet", 2)}
BAD = ("empty.pt", "text.pt", "passwd.pt", "truncated.safetensors", "evil.pt")
# Fields that depend on when and where a model was audited, not on the model.
VOLATILE = ("seconds", "detect_seconds", "data_seconds", "audited_at")


def _soda_detect(path: Path, data_dir: Path) -> dict:
    """What `soda detect --json` computes for a file, through the workflow layer."""
    from soda_backdoor.data import load_dataset
    from soda_backdoor.workflow import DataContext, detect, open_model, resolve_attack

    data = load_dataset("fmnist", str(data_dir))
    loaded = open_model(str(path), data, torch.device("cpu"))
    ctx = DataContext.build(data, resolve_attack(data, None, None, loaded.meta, False), 0)
    return detect(loaded, ctx, DetectionConfig(), None, "cpu", 0).to_dict()


class _Evil:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save(path: Path, arch: str, seed: int) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, create_model(arch, 10, 1, 28),
               ModelMeta(arch=arch, num_classes=10, in_channels=1, input_size=28, mean=(0.0,), std=(1.0,),
                         dataset="fmnist"))
    return path


def _write_bad_files(folder: Path, marker: Path) -> None:
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("these are not the weights you are looking for\n")
    shutil.copy("/etc/passwd", folder / "passwd.pt")
    whole = (folder / "cnn0.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    with open(folder / "evil.pt", "wb") as fh:
        pickle.dump({"weight": _Evil(marker)}, fh)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    data = write_fmnist_idx(root / "fm")
    models = root / "models"
    for name, (arch, seed) in GOOD.items():
        _save(models / name, arch, seed)
    marker = root / "PWNED"
    _write_bad_files(models, marker)
    return {"root": root, "data": data, "models": models, "marker": marker}


def _config(fleet, out: Path, **kw) -> AuditConfig:
    return AuditConfig(out_dir=str(out), paths=(str(fleet["models"]),), dataset="fmnist", data_dir=str(fleet["data"]),
                       arch="cnn", device="cpu", **kw)


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def local_audit(fleet) -> Path:
    out = fleet["root"] / "local"
    rc = main(["audit", str(fleet["models"]), "--arch", "cnn", "--dataset", "fmnist", "--data-dir", str(fleet["data"]),
               "--out", str(out), "--jobs", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    return out


@pytest.mark.parametrize("name", BAD + ("/etc/passwd",))
def test_detect_refuses_non_models_with_one_line(fleet, capsys, name: str) -> None:
    path = name if name.startswith("/") else str(fleet["models"] / name)
    rc = main(["detect", "--model", path, "--arch", "cnn", "--dataset", "fmnist", "--data-dir", str(fleet["data"]),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("soda detect: error:"), err
    assert not fleet["marker"].exists()


def test_local_audit_matches_detect_and_isolates_bad_files(fleet, local_audit) -> None:
    rows = read_jsonl(local_audit / AUDIT_LOG)
    by_file = {Path(r["file"]).relative_to(fleet["models"]).as_posix(): r for r in rows.values()}
    assert sorted(by_file) == sorted([*GOOD, *BAD])
    assert not fleet["marker"].exists()  # nothing ran from the pickle
    for name in BAD:
        row = by_file[name]
        assert row["verdict"] == "error" and row["error"] and "\n" not in row["error"], row
        assert row["pairs"] == [] and row["max_anomaly"] is None
    assert "could run code" in by_file["evil.pt"]["error"]
    for name, (arch, _) in GOOD.items():
        row = by_file[name]
        ref = _soda_detect(fleet["models"] / name, fleet["data"])
        assert row["error"] == "" and row["arch"] == arch
        assert row["verdict"] == ("backdoor" if ref["backdoor"] else "clean")
        assert row["pairs"] == [[p["source"], p["target"]] for p in ref["pairs"]]
        assert row["target_scores"] == pytest.approx(ref["target_test"]["scores"], abs=1e-9)
        assert row["anomaly_index"] == pytest.approx(ref["target_test"]["anomaly_index"], abs=1e-9, nan_ok=True)
        # the shipped calibration (cnn and lenet on fmnist, the default settings) gives it
        assert 0 < row["probability"] < 1 and row["probability"] == pytest.approx(ref["calibration"]["probability"])
        assert row["evidence"] == ref["evidence"] == "errors"  # the shipped reference covers fmnist
        assert row["score"] == pytest.approx(ref["errors"]["score"]) and row["threshold"] == ref["errors"]["config"]["tau"]
        report = json.loads((local_audit / row["report"]).read_text())
        assert report["detect"]["pairs"] == ref["pairs"] and report["row"]["sha256"] == row["sha256"]
    csv_lines = (local_audit / "audit.csv").read_text().splitlines()
    assert csv_lines[0].startswith("file,sha256,verdict,pairs") and len(csv_lines) == 1 + len(GOOD) + len(BAD)
    page = (local_audit / "audit.html").read_text()
    assert "<script>" in page and all(f"href='{r['report']}'" in page for r in rows.values())


def test_audit_verdict_equals_soda_detect_json(fleet, local_audit, tmp_path) -> None:
    model = fleet["models"] / "cnn1.safetensors"
    assert main(["detect", "--model", str(model), "--dataset", "fmnist", "--data-dir", str(fleet["data"]),
                 "--device", "cpu", "--quiet", "--json", str(tmp_path / "d.json")]) == 0
    ref = json.loads((tmp_path / "d.json").read_text())
    row = next(r for r in read_jsonl(local_audit / AUDIT_LOG).values() if r["file"] == str(model))
    report = json.loads((local_audit / row["report"]).read_text())["detect"]
    for key in ("backdoor", "pairs", "layer", "sources"):
        assert report[key] == ref[key]
    assert report["target_test"]["scores"] == pytest.approx(ref["target_test"]["scores"], abs=1e-9)


def test_rerun_skips_audited_files_and_redoes_failures(fleet, local_audit, tmp_path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(local_audit, out)
    log = out / AUDIT_LOG
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    good_lines = [i for i, r in enumerate(rows) if r["verdict"] != "error"]
    # Lose the last good model's line (an audit killed before it recorded it) and tear another.
    lost = rows[good_lines[-1]]
    kept = [line for i, line in enumerate(log.read_text().splitlines()) if i != good_lines[-1]]
    log.write_text("\n".join(kept) + "\n" + json.dumps(lost)[:30])
    rep = run_audit(_config(fleet, out, jobs=1))
    assert (rep.found, rep.skipped, rep.audited, rep.failed) == (len(GOOD) + len(BAD), len(GOOD) - 1, 1, len(BAD))
    again = read_jsonl(log)
    assert _stable(again[lost["key"]]) == _stable(lost)
    # Nothing failed in between: a third run redoes only the bad files.
    rep = run_audit(_config(fleet, out, jobs=1))
    assert (rep.skipped, rep.audited, rep.failed) == (len(GOOD), 0, len(BAD))


def killing_worker(task, datasets=None):
    """``audit_model``, except that a file named ``kill*`` kills its worker process mid-model."""
    if Path(task.path).name.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    return audit_model(task, datasets)


def test_worker_killed_mid_model_gives_an_error_row(fleet, tmp_path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in list(GOOD)[:2]:
        shutil.copy(fleet["models"] / name, folder / Path(name).name)
    _save(folder / "kill.safetensors", "cnn", 7)
    cfg = replace(_config(fleet, tmp_path / "out", jobs=2), paths=(str(folder),))
    rep = run_audit(cfg, worker=killing_worker)
    rows = {Path(r["file"]).name: r for r in read_jsonl(tmp_path / "out" / AUDIT_LOG).values()}
    assert rows["kill.safetensors"]["verdict"] == "error"
    assert "worker process died" in rows["kill.safetensors"]["error"]
    assert all(rows[Path(n).name]["verdict"] != "error" for n in list(GOOD)[:2])
    assert (rep.audited, rep.failed) == (2, 1)


def test_flagged_models_come_first() -> None:
    rows = [{"verdict": v, "file": f, "max_anomaly": a, "sha256": f * 8, "report": f"models/{f}.json",
             "pairs": [[0, 3]] if v == "backdoor" else [], "seconds": 1.0}
            for v, f, a in (("clean", "a", 3.0), ("error", "b", None), ("backdoor", "c", 5.0), ("backdoor", "d", 9.0))]
    assert [r["file"] for r in sort_rows(rows)] == ["d", "c", "b", "a"]
    page = rows_html(rows, "t")
    assert page.index("models/d.json") < page.index("models/c.json") < page.index("models/b.json")


def test_bad_arguments_exit_2(fleet, tmp_path, capsys, monkeypatch) -> None:
    base = ["audit", "--dataset", "fmnist", "--data-dir", str(fleet["data"]), "--out", str(tmp_path / "o"), "--quiet"]
    for extra, msg in (([str(tmp_path / "nope")], "does not exist"), ([], "nothing to audit"),
                       ([str(fleet["models"]), "--jobs", "0"], "--jobs must be at least 1"),
                       ([str(fleet["models"]), "--ray-address", "auto"], "--ray-address needs --backend ray")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and msg in err, err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(base + [str(fleet["models"] / "cnn0.safetensors"), "--backend", "ray"]) == 2
    assert "pip install 'soda-backdoor[ray]'" in capsys.readouterr().err


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.ray
@pytest.mark.skipif(not _ray_available(), reason="needs the ray extra: pip install 'soda-backdoor[ray]'")
def test_ray_backend_gives_identical_rows(fleet, local_audit, tmp_path) -> None:
    out = tmp_path / "ray"
    rep = run_audit(_config(fleet, out, jobs=2, backend="ray"))
    assert (rep.audited, rep.failed) == (len(GOOD), len(BAD))
    local = read_jsonl(local_audit / AUDIT_LOG)
    ray_rows = read_jsonl(out / AUDIT_LOG)
    assert sorted(local) == sorted(ray_rows)
    for key, row in ray_rows.items():
        assert _stable(row) == _stable(local[key])
    assert not fleet["marker"].exists()


@pytest.mark.ray
@pytest.mark.skipif(not _ray_available(), reason="needs the ray extra: pip install 'soda-backdoor[ray]'")
def test_zoo_builds_on_ray(tmp_path, capsys) -> None:
    from test_model_zoo import _tiny_zoo_files

    spec = _tiny_zoo_files(tmp_path)
    out = tmp_path / "zoo"
    assert main(["zoo", "build", str(spec), "--out", str(out), "--jobs", "2", "--backend", "ray", "--quiet"]) == 0
    rows = read_jsonl(out / "manifest.jsonl")
    assert {r["attack"] for r in rows.values()} == {"patch", "none"}
    assert all((out / r["file"]).is_file() and r["threads"] == 1 for r in rows.values())
    assert "2 trained, 0 failed" in capsys.readouterr().out


def test_audit_with_a_calibration_fills_the_probability(fleet, tmp_path) -> None:
    from soda_backdoor.artifacts import save_calibration
    from soda_backdoor.detection import fit_calibration
    from test_calibration import _rows

    save_calibration(tmp_path / "c.json", fit_calibration(_rows({"cnn": (6, 8), "lenet": (5, 5)}), "soda"))
    run_audit(_config(fleet, tmp_path / "cal", calibration=str(tmp_path / "c.json"), jobs=2))
    rows = list(read_jsonl(tmp_path / "cal" / AUDIT_LOG).values())
    good = [r for r in rows if r["verdict"] != "error"]
    assert len(good) == len(GOOD) and all(0 < r["probability"] < 1 for r in good)
    assert all(r["probability"] is None for r in rows if r["verdict"] == "error")
    assert "probability" in (tmp_path / "cal" / "audit.csv").read_text().splitlines()[0]
