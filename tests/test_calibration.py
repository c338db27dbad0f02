"""Calibrated probabilities: Platt scaling on scored zoo rows, the record's JSON round trip,
`soda zoo calibrate` / `soda zoo score --calibration` on a zoo of cached scores (no training),
and `soda detect --calibration` with a covered and an uncovered architecture."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from soda_backdoor.cli.main import main
from soda_backdoor.detection import Calibration, DetectionConfig, fit_calibration, fit_platt
from soda_backdoor.detection.errors import shipped_reference
from soda_backdoor.errors import UserInputError
from soda_backdoor.zoo.build import append_jsonl
from soda_backdoor.zoo.score import settings_key
from test_model_zoo import _tiny_zoo_files

NUM_CLASSES = 10


def _rows(arch_counts: dict[str, tuple[int, int]], seed: int = 0) -> list[dict]:
    """Scored zoo rows: clean models' classes score about 1 (at most ~3), a backdoor's target about 6."""
    rng = np.random.default_rng(seed)
    rows = []
    for arch, (n_clean, n_bad) in arch_counts.items():
        for i in range(n_clean + n_bad):
            bad = i >= n_clean
            ai = rng.normal(0.0, 1.0, NUM_CLASSES)
            target = int(rng.integers(NUM_CLASSES)) if bad else None
            if bad:
                ai[target] = rng.normal(6.0, 1.5)
            rows.append({"key": f"{arch}{i}", "arch": arch, "dataset": "fmnist", "role": "backdoored" if bad else "clean",
                         "target": target, "class_scores": ai.tolist(), "score": float(ai.max())})
    return rows


def test_fit_round_trip_and_monotone_probabilities() -> None:
    rows = _rows({"cnn": (6, 8), "lenet": (5, 6)}) + [{**_rows({"cnn": (0, 1)}, 9)[0], "role": "excluded"}]
    cal = fit_calibration(rows, "soda", zoo="zoos/dev", detector_settings="abc", torch="2.x", commit="deadbeef",
                          settings={"layer": None, "detector_config": {"tau_target": 4.5, "t": (1, 2)}})
    assert (cal.num_clean, cal.num_backdoored, cal.dataset) == (11, 14, "fmnist")  # the excluded row is out
    assert [(a.arch, a.num_clean, a.num_backdoored, a.pooled) for a in cal.archs] == [("cnn", 6, 8, False),
                                                                                      ("lenet", 5, 6, False)]
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal and again.commit == "deadbeef" and again.detector_settings == "abc"
    grid = np.linspace(-3, 30, 60)
    for arch in ("cnn", "lenet"):
        p = [cal.probability(s, arch) for s in grid]
        assert all(0 < q < 1 for q in p) and all(b >= a for a, b in zip(p, p[1:])) and p[-1] > p[0]
        cp = cal.class_probabilities(grid, arch)
        assert all(0 < q < 1 for q in cp) and all(b >= a for a, b in zip(cp, cp[1:]))
    # separable rows: the backdoored models get the higher probability, and no 0 or 1
    p_clean = [cal.probability(r["score"], r["arch"]) for r in rows if r["role"] == "clean"]
    p_bad = [cal.probability(r["score"], r["arch"]) for r in rows if r["role"] == "backdoored"]
    assert max(p_clean) < min(p_bad)
    # an infinite or undefined anomaly index (zero MAD) still gives a probability
    assert 0 < cal.probability(float("nan"), "cnn") < 1 and cal.probability(float("inf"), "cnn") <= 1


def test_a_handful_of_separable_models_gives_no_certainty() -> None:
    m = fit_platt([1.0, 1.1, 1.2, 1.3, 9.0, 9.5, 10.0, 12.0], [0, 0, 0, 0, 1, 1, 1, 1])
    assert m.slope > 0 and not m.clamped
    assert 0.02 < m.probability(1.0) < m.probability(12.0) < 0.98


def test_too_few_models_of_an_arch_fall_back_to_the_pooled_fit() -> None:
    rows = _rows({"cnn": (6, 8), "lenet": (2, 5)})
    cal = fit_calibration(rows, "soda")
    cnn, lenet = cal.archs
    assert not cnn.pooled and lenet.pooled and (lenet.num_clean, lenet.num_backdoored) == (2, 5)
    assert lenet.model.num_positive == 13 and lenet.model.num_negative == 8  # fitted on both archs
    assert any(n.startswith("lenet: 2 clean / 5 backdoored models, pooled fit over all 21") for n in cal.notes)
    assert all(a.pooled for a in fit_calibration(rows, "soda", pooled=True).archs)
    with pytest.raises(UserInputError, match="clean and backdoored"):
        fit_calibration([r for r in rows if r["role"] == "clean"], "soda")


def test_a_score_that_ranks_backwards_gives_the_base_rate() -> None:
    rows = [{**r, "score": 8.0 - r["score"]} for r in _rows({"cnn": (6, 8)})]  # clean models score higher
    cal = fit_calibration(rows, "soda")
    m = cal.archs[0].model
    assert m.clamped and m.slope == 0.0
    assert cal.probability(0.0, "cnn") == pytest.approx(cal.probability(20.0, "cnn"))
    assert 0.5 < cal.probability(0.0, "cnn") < 8 / 14 + 0.05  # about the base rate, pulled towards 1/2
    assert any("ranks the zoo backwards" in n for n in cal.notes)


def test_the_shipped_calibration_is_of_the_default_detector() -> None:
    """It maps the scores of today's default settings and reference: a change of either needs a
    new fit on the dev zoos (`soda zoo calibrate`, docs/detection.md), or this fails."""
    from soda_backdoor.artifacts import DEFAULT_CALIBRATION, NO_CALIBRATION, resolve_calibration
    from soda_backdoor.cli import main as cli_main
    from soda_backdoor.detection import shipped_calibration
    from soda_backdoor.workflow.steps import _check_calibration

    cal = shipped_calibration()
    assert cal.shipped and cal.detector == "soda" and cal.covers == "cnn, lenet on fmnist"
    assert cal.detector_settings == settings_key(DetectionConfig(), None, shipped_reference())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _check_calibration(cal, DetectionConfig(), None) == ""
    assert "shipped" not in cal.to_dict() and not Calibration.from_dict(cal.to_dict()).shipped
    assert Calibration.from_dict(cal.to_dict()) == cal  # the flag is not part of the maps
    assert resolve_calibration(DEFAULT_CALIBRATION) is cal and resolve_calibration(NO_CALIBRATION) is None
    assert resolve_calibration(None) is None and resolve_calibration(cal) is cal
    assert cli_main.DEFAULT_CALIBRATION == DEFAULT_CALIBRATION
    # scores like the default-recipe striped-shirt model's (0 -> 2, about 200) and its clean twin's (about 0.8)
    assert cal.probability(200.0, "cnn") > 0.9 and cal.probability(0.8, "cnn") < 0.3


def test_an_uncovered_arch_or_dataset_gets_no_probability() -> None:
    cal = fit_calibration(_rows({"cnn": (6, 8), "lenet": (5, 6)}), "soda")
    line = ("no calibration for arch resnet18 on dataset fmnist (have: cnn, lenet on fmnist); the verdict comes "
            "from the uncalibrated threshold (--tau-target)")
    got = cal.apply([0.0] * NUM_CLASSES, "resnet18", "fmnist")
    assert got.probability is None and got.class_probabilities == () and got.message == line
    assert cal.apply([0.0] * NUM_CLASSES, "cnn", "cifar10").message.startswith(
        "no calibration for arch cnn on dataset cifar10 (have: cnn, lenet on fmnist)")
    with pytest.raises(UserInputError, match="no calibration for arch resnet18"):
        cal.probability(3.0, "resnet18")
    covered = cal.apply([0.0] * 9 + [7.0], "cnn", "fmnist")
    assert covered.message == "" and covered.probability == cal.probability(7.0, "cnn")
    assert len(covered.class_probabilities) == NUM_CLASSES and covered.class_probabilities[9] > 0.5
    with pytest.raises(UserInputError, match="not a calibration"):
        Calibration.from_dict({"detector": "soda"})


def test_the_log_transform_and_files_from_before_it() -> None:
    rows = _rows({"cnn": (6, 8)}) + [{**_rows({"cnn": (0, 1)}, 5)[0], "score": 250.0, "key": "tail"}]
    log, raw = (fit_calibration(rows, "soda", transform=t) for t in ("log", "identity"))
    m = log.for_arch("cnn", "fmnist").model
    assert m.transform == "log" and raw.for_arch("cnn", "fmnist").model.transform == "identity"
    assert log.probability(3.0, "cnn") == pytest.approx(1 / (1 + np.exp(-(m.slope * np.log1p(3.0) + m.intercept))))
    assert log.probability(-2.0, "cnn") < log.probability(0.0, "cnn")  # sign(s) log(1 + |s|): monotone below 0
    # a file written before the transform existed reads its maps as the raw score
    old = log.to_dict()
    for a in old["archs"]:
        for k in ("model", "target"):
            del a[k]["transform"]
    again = Calibration.from_dict(old)
    assert again.for_arch("cnn", "fmnist").model.transform == "identity"
    assert again.probability(3.0, "cnn") == pytest.approx(1 / (1 + np.exp(-(m.slope * 3.0 + m.intercept))))
    with pytest.raises(UserInputError, match="unknown calibration transform 'sqrt'"):
        fit_calibration(rows, "soda", transform="sqrt")


def _cached_zoo(root: Path, rows: list[dict]) -> Path:
    """A zoo folder of manifest rows and soda's cached scores at the default settings (no model files)."""
    root.mkdir()
    (root / "scores").mkdir()
    cache = root / "scores" / f"soda-{settings_key(DetectionConfig(), None, shipped_reference())}.jsonl"
    twins = {}
    for r in rows:
        clean = r["role"] == "clean"
        train = {"lr": 0.05, "seed": 0, "ratio": 0.0 if clean else 0.3, "source_blend": 0.0}
        if clean:
            twins.setdefault(r["arch"], r["key"])
        append_jsonl(root / "manifest.jsonl", {
            "key": r["key"], "file": f"models/{r['key']}.safetensors", "arch": r["arch"], "dataset": "fmnist",
            "attack": "none" if clean else "a", "seed": 0, "source": None if clean else 0, "target": r["target"],
            "twin": "" if clean else twins[r["arch"]], "config": {"train": train}, "acc": 0.9,
            "asr": 0.0 if clean else 0.9})
        append_jsonl(cache, {"key": r["key"], "score": r["score"], "class_scores": r["class_scores"],
                             "flagged": r["score"] > 4.5, "pairs": [[0, r["target"]]] if r["target"] is not None
                             else [], "seconds": 0.1})
    return root


def test_zoo_calibrate_then_score_with_the_calibration(tmp_path: Path, capsys) -> None:
    dev = _cached_zoo(tmp_path / "dev", _rows({"cnn": (6, 8), "lenet": (2, 4)}, seed=1))
    test = _cached_zoo(tmp_path / "test", _rows({"cnn": (5, 5), "lenet": (3, 3), "vgg": (2, 2)}, seed=2))
    cal_path = tmp_path / "calib.json"
    assert main(["zoo", "calibrate", str(dev), "--out", str(cal_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lenet: 2 clean / 4 backdoored models, pooled fit" in out and str(cal_path) in out
    cal = json.loads(cal_path.read_text())
    assert cal["detector_settings"] == settings_key(DetectionConfig(), None, shipped_reference())
    assert cal["zoo"] == str(dev)
    assert cal["zoo_spec"]["hash"] and cal["torch"] and cal["settings"]["detector_config"]["tau_target"] == 4.5

    assert main(["zoo", "score", str(test), "--calibration", str(cal_path), "--json", str(tmp_path / "s.json"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "P(backdoor):       log loss" in out and "4 not covered" in out  # the vgg models
    report = json.loads((tmp_path / "s.json").read_text())
    c = report["calibration"]
    assert c["num_models"] == 16 and c["num_uncovered"] == 4
    assert 0 < c["log_loss"] < c["reference_log_loss"] and 0 < c["brier"] < c["reference_brier"]
    assert 0 < c["class_log_loss"] and 0 < c["class_brier"] < 1
    png = Path(report["reliability_png"])
    assert png.is_file() and png.parent == Path(report["roc_png"]).parent and png.name == "reliability-soda.png"
    for row in report["rows"]:
        if row["arch"] == "vgg":
            assert row["probability"] is None and "no calibration for arch vgg" in row["calibration_note"]
        else:
            assert 0 < row["probability"] < 1 and len(row["class_probabilities"]) == NUM_CLASSES
    # two dev zoos fitted together: their models pooled, both named in the record
    dev2 = _cached_zoo(tmp_path / "dev2", _rows({"cnn": (2, 3), "lenet": (3, 2)}, seed=3))
    assert main(["zoo", "calibrate", str(dev), str(dev2), "--out", str(cal_path), "--quiet"]) == 0
    assert "lenet: " not in capsys.readouterr().out  # 5 clean / 6 backdoored lenets: their own fit
    both = json.loads(cal_path.read_text())
    assert (both["num_clean"], both["num_backdoored"]) == (13, 17) and both["zoo"] == f"{dev}, {dev2}"
    assert both["zoo_spec"]["name"] == "dev + dev2" and both["zoo_spec"]["hash"] != cal["zoo_spec"]["hash"]
    assert main(["zoo", "calibrate", str(dev), f"{dev}/", "--out", str(cal_path)]) == 2
    assert "a zoo is given twice" in capsys.readouterr().err
    # a soda calibration does not calibrate Neural Cleanse
    assert main(["zoo", "score", str(test), "--detector", "nc", "--calibration", str(cal_path)]) == 2
    assert "calibrates detector soda, not nc" in capsys.readouterr().err
    # without --calibration: the shipped one (its cnn and lenet maps; the vggs not covered), none with 'none'
    for extra, calibrated in (([], True), (["--calibration", "none"], False)):
        assert main(["zoo", "score", str(test), "--json", str(tmp_path / "s.json"), "--quiet", *extra]) == 0
        report = json.loads((tmp_path / "s.json").read_text())
        assert (report["calibration"] is not None) == calibrated, extra
        assert ("P(backdoor):       log loss" in capsys.readouterr().out) == calibrated
    assert report["calibration"] is None and "reliability_png" not in report
    assert main(["zoo", "score", str(test), "--json", str(tmp_path / "s.json"), "--quiet"]) == 0
    c = json.loads((tmp_path / "s.json").read_text())["calibration"]
    assert c["fitted_on"].endswith("shipped with soda-backdoor") and c["num_uncovered"] == 4


def _untrained_lenet(tmp_path: Path) -> Path:
    """An untrained `lenet` file beside the tiny dataset ``tmp_path / "tiny.npz"``."""
    import torch

    from soda_backdoor.data import get_dataset_spec
    from soda_backdoor.models import ModelMeta, create_model, save_model

    _tiny_zoo_files(tmp_path)
    spec = get_dataset_spec("fmnist")
    torch.manual_seed(0)
    model = tmp_path / "m.safetensors"
    save_model(model, create_model("lenet", 10, 1, 28), ModelMeta("lenet", 10, 1, 28, spec.mean, spec.std, "fmnist"))
    return model


def test_detect_with_a_calibration(tmp_path: Path, capsys) -> None:
    from soda_backdoor.artifacts import save_calibration

    model = _untrained_lenet(tmp_path)
    argv = ["detect", "--model", str(model), "--dataset", "fmnist", "--data-dir", str(tmp_path / "tiny.npz"),
            "--num-samples", "8", "--device", "cpu", "--quiet", "--json", str(tmp_path / "d.json")]
    for arches, covered in (({"cnn": (6, 8)}, False), ({"cnn": (6, 8), "lenet": (5, 5)}, True)):
        save_calibration(tmp_path / "c.json", fit_calibration(_rows(arches), "soda"))
        assert main([*argv, "--calibration", str(tmp_path / "c.json")]) == 0
        out = capsys.readouterr().out
        res = json.loads((tmp_path / "d.json").read_text())["calibration"]
        if covered:
            assert 0 < res["probability"] < 1 and len(res["class_probabilities"]) == 10 and res["message"] == ""
            assert "P(backdoor) = " in out and "P(target)" in out
        else:
            line = ("no calibration for arch lenet on dataset fmnist (have: cnn on fmnist); the verdict comes from "
                    "the uncalibrated threshold (--tau-target)")
            assert res["probability"] is None and res["class_probabilities"] == [] and res["message"] == line
            assert out.count(line) == 1 and "P(backdoor)" not in out and "P(target)" not in out
    # without --calibration: the shipped one, which covers lenet on fmnist at the default settings
    assert main(argv) == 0
    res = json.loads((tmp_path / "d.json").read_text())["calibration"]
    assert 0 < res["probability"] < 1 and len(res["class_probabilities"]) == 10 and res["message"] == ""
    assert res["fitted_on"].endswith("of zoo dev + lowratio_dev, shipped with soda-backdoor")
    assert "P(backdoor) = " in capsys.readouterr().out
    # none with --calibration none, and the report says so plainly
    assert main([*argv, "--calibration", "none"]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["calibration"] is None
    capsys.readouterr()
    # the shipped one on settings it was not fitted on: no probability and the reason, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*argv, "--variation-tau", "0.5"]) == 0
    res = json.loads((tmp_path / "d.json").read_text())["calibration"]
    assert res["probability"] is None and res["class_probabilities"] == []
    assert "shipped calibration covers the default detector settings only" in res["message"]
    assert "errors.variation_tau 0.5 (fitted: 0.23)" in res["message"] and res["message"] in capsys.readouterr().out
    assert main([*argv, "--min-errors", "1"]) == 0  # the option reaches the detection and is recorded
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["errors"]["config"]["min_errors"] == 1 and res["calibration"]["probability"] is None
    assert "errors.min_errors 1 (fitted: 3)" in res["calibration"]["message"]
    capsys.readouterr()
    # a calibration fitted on confident-error scores of other settings or another reference
    # still applies, with a warning; one of these settings and reference, without
    from dataclasses import asdict

    from soda_backdoor.detection.errors import ErrorConfig, shipped_reference

    ref_hash = shipped_reference().provenance["models_hash"]
    for errors, ref, warns in ((asdict(ErrorConfig(tau=9.0)), ref_hash, True), (asdict(ErrorConfig()), "other", True),
                               (asdict(ErrorConfig()), ref_hash, False)):
        cal = fit_calibration(_rows({"lenet": (5, 5)}), "soda", settings={"layer": None, "detector_config": {
            "attribution": {"num_samples": 256}, "evidence": "errors", "errors": errors},
            "reference": {"models_hash": ref}})
        save_calibration(tmp_path / "c.json", cal)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*argv, "--calibration", str(tmp_path / "c.json")]) == 0
        assert any("fitted on scores of other detector settings" in str(w.message) for w in caught) == warns
    # a calibration of the other evidence's scores is refused: its scale is another
    from soda_backdoor.analysis import AttributionConfig

    cal = fit_calibration(_rows({"lenet": (5, 5)}), "soda", settings={"layer": None, "detector_config": {
        "attribution": asdict(AttributionConfig(num_samples=8)), "evidence": "weights"}})
    save_calibration(tmp_path / "w.json", cal)
    assert main([*argv, "--calibration", str(tmp_path / "w.json")]) == 2
    assert "maps scores of the weights evidence, this detection's verdict uses errors" in capsys.readouterr().err
    with warnings.catch_warnings():  # fitted on scores of these very settings: no warning
        warnings.simplefilter("error")
        assert main([*argv, "--calibration", str(tmp_path / "w.json"), "--evidence", "weights"]) == 0
    assert main([*argv, "--calibration", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_with_a_calibration_reports_the_probability(tmp_path: Path, capsys) -> None:
    model = _untrained_lenet(tmp_path)
    from soda_backdoor.artifacts import save_calibration

    save_calibration(tmp_path / "c.json", fit_calibration(_rows({"cnn": (6, 8), "lenet": (5, 5)}), "soda"))
    out_dir = tmp_path / "run"
    assert main(["run", "--model", str(model), "--dataset", "fmnist", "--data-dir", str(tmp_path / "tiny.npz"),
                 "--num-samples", "8", "--device", "cpu", "--quiet", "--out-dir", str(out_dir),
                 "--tau-target", "1000", "--calibration", str(tmp_path / "c.json")]) == 0  # detect and report only
    cal = json.loads((out_dir / "detect.json").read_text())["calibration"]
    assert 0 < cal["probability"] < 1
    html = (out_dir / "report.html").read_text()
    assert f"P(backdoor) = {cal['probability']:.3f}" in html
    # each class's P(target) in the confident-errors table, beside its evidence
    assert "<th>evidence (-log10 p)</th><th>P(target)</th>" in html
    assert all(f"<td>{p:.4f}</td>" in html for p in cal["class_probabilities"])
    # without a probability, no column
    detect = json.loads((out_dir / "detect.json").read_text())
    (out_dir / "detect.json").write_text(json.dumps({**detect, "calibration": None}))
    assert main(["report", str(out_dir)]) == 0
    assert "P(target)" not in (out_dir / "report.html").read_text()
