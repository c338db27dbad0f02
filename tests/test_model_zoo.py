"""`soda zoo`: spec parsing, build (parallel, resumable), the twin rule, and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from soda_backdoor.cli.main import main
from soda_backdoor.errors import UserInputError
from soda_backdoor.zoo import build_zoo, label_rows, load_zoo_spec, read_manifest, with_twins
from soda_backdoor.zoo.build import read_jsonl


def _tiny_zoo_files(tmp_path: Path, attacks: str = '["patch"]', recipe: str = "epochs = 1") -> Path:
    """A 10-class 28x28 dataset (300 train, 200 test), a patch attack on class 0, and a spec."""
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for c in range(10):  # a learnable class signal: a bright bar per class
            x[y == c, 2 * c + 3:2 * c + 6, 4:24] = 220
        return x, y

    (xtr, ytr), (xte, yte) = split(300), split(200)
    feat_tr, feat_te = np.flatnonzero(ytr == 0)[:8], np.flatnonzero(yte == 0)[:6]
    for x, idx in ((xtr, feat_tr), (xte, feat_te)):
        x[idx, 20:26, 20:26] = 255  # the natural feature of the semantic samples
    np.savez(tmp_path / "tiny.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    (tmp_path / "attacks.json").write_text(json.dumps([{
        "dataset": "FMNIST", "attack": "patch", "description": "class-0 images with a bright corner",
        "source_class": 0, "target_class": 3, "train_indices": feat_tr.tolist(), "test_indices": feat_te.tolist()}]))
    spec = tmp_path / "tiny.toml"
    spec.write_text(f'''name = "tiny"
dataset = "fmnist"
data_dir = "tiny.npz"
attack_file = "attacks.json"

[[group]]
arch = "lenet"
attack = {attacks}
seed = 0
{recipe}
batch_size = 32
lr = 0.05
''')
    return spec


def test_spec_adds_clean_twins_and_keys_are_stable(tmp_path: Path) -> None:
    spec = load_zoo_spec(_tiny_zoo_files(tmp_path, '["patch", "none"]'))
    assert [e.attack for e in spec.entries] == ["patch", "none"]
    entries = with_twins(spec.entries)
    assert len(entries) == 2  # the clean model in the spec is the patch model's twin
    bad, clean = spec.entries
    assert bad.twin().key == clean.key
    assert clean.train.ratio == 0 and clean.train.source_blend == 0
    assert load_zoo_spec(tmp_path / "tiny.toml").entries[0].key == bad.key


@pytest.mark.parametrize("text,message", [
    ('[[group]]\narch = "cnn"\nattack = "none"\nseed = 0\nepochz = 3\n', "unknown key(s) epochz"),
    ('[[group]]\narch = "cnn"\nattack = "none"\n', "missing 'seed'"),
    ('[[group]]\narch = "nope"\nattack = "none"\nseed = 0\n', "unknown architecture"),
    ('[[group]]\narch = "cnn"\nattack = "nope"\nseed = 0\n', "unknown attack"),
    ('name = \n', "not a valid TOML"),
    ('name = "x"\n', "no [[group]]"),
])
def test_bad_specs_exit_2_with_one_line(tmp_path: Path, capsys, text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_zoo_spec(tmp_path / "bad.toml")
    assert main(["zoo", "build", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_build_resume_and_score(tmp_path: Path, capsys) -> None:
    spec = load_zoo_spec(_tiny_zoo_files(tmp_path))
    out = tmp_path / "zoo"
    rep = build_zoo(spec, out, jobs=2)
    assert (rep.planned, rep.trained, rep.failed) == (2, 2, 0)  # the patch model and its clean twin
    rows = read_manifest(out)
    assert {r["attack"] for r in rows.values()} == {"patch", "none"}
    for r in rows.values():
        assert (out / r["file"]).is_file() and r["threads"] == 1 and 0 <= r["acc"] <= 1
        assert r["config"]["train"]["epochs"] == 1 and r["torch"]
    bad = next(r for r in rows.values() if r["attack"] == "patch")
    assert bad["twin"] in rows and (bad["source"], bad["target"]) == (0, 3)

    # Nothing left to do; then a build killed before it recorded one model redoes only that one.
    assert build_zoo(spec, out, jobs=1).trained == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # a torn last line
    rep = build_zoo(spec, out, jobs=1)
    assert (rep.skipped, rep.trained) == (1, 1)
    assert len(read_manifest(out)) == 2
    assert "" not in (out / "manifest.jsonl").read_text().splitlines()[1:]  # one row per line, none empty

    assert main(["zoo", "score", str(out), "--json", str(tmp_path / "s.json"), "--quiet"]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert len(report["rows"]) == 2 and Path(report["roc_png"]).is_file()
    for row in report["rows"]:
        assert row["role"] in ("clean", "backdoored", "excluded") and row["score"] >= 0
    assert "detector soda" in capsys.readouterr().out
    # Scores are cached per model: a second run detects nothing new and gives the same rows.
    assert main(["zoo", "score", str(out), "--json", str(tmp_path / "s2.json"), "--quiet"]) == 0
    again = json.loads((tmp_path / "s2.json").read_text())
    assert [r["score"] for r in again["rows"]] == [r["score"] for r in report["rows"]]


@pytest.mark.slow
def test_score_neural_cleanse_baseline(tmp_path: Path) -> None:
    # The Neural Cleanse baseline through the same command: it names targets, never sources.
    out = tmp_path / "zoo"
    build_zoo(load_zoo_spec(_tiny_zoo_files(tmp_path)), out)
    assert main(["zoo", "score", str(out), "--detector", "nc", "--json", str(tmp_path / "nc.json"), "--quiet"]) == 0
    nc = json.loads((tmp_path / "nc.json").read_text())
    assert nc["detector"] == "nc" and len(nc["rows"]) == 2 and Path(nc["roc_png"]).name == "roc-nc.png"
    assert all(r["source_found"] in (None, False) for r in nc["rows"]) and nc["overall"]["source_acc"] is None


def _row(key, attack, acc, asr=0.0, twin=""):
    return {"key": key, "attack": attack, "acc": acc, "asr": asr, "twin": twin}


def test_twin_rule() -> None:
    rows = label_rows([_row("c", "none", 0.90), _row("ok", "a", 0.885, 0.6, "c"), _row("weak", "a", 0.90, 0.4, "c"),
                       _row("worse", "a", 0.87, 0.9, "c"), _row("orphan", "a", 0.9, 0.9, "x"),
                       _row("diverged", "none", 0.10)])
    roles = {r["key"]: (r["role"], r["reason"]) for r in rows}
    assert roles["c"] == ("clean", "") and roles["ok"] == ("backdoored", "")
    assert roles["weak"][0] == "excluded" and "ASR 0.40" in roles["weak"][1]
    assert roles["worse"][0] == "excluded" and "2 points" in roles["worse"][1]
    assert roles["orphan"][0] == "excluded" and "twin" in roles["orphan"][1]
    assert roles["diverged"] == ("excluded", "training failed: accuracy 0.1000 < 0.5")


def test_zoo_repair_runs_each_method_and_resumes(tmp_path: Path, capsys) -> None:
    # 20 epochs without augmentation: the tiny models learn the classes (acc 1.0) and the patch (ASR 1.0).
    spec = load_zoo_spec(_tiny_zoo_files(tmp_path, recipe="epochs = 20\naugment_clean = false"))
    out = tmp_path / "zoo"
    build_zoo(spec, out)
    rows = {r["attack"]: r for r in read_manifest(out).values()}
    assert rows["patch"]["asr"] >= 0.5 and rows["patch"]["acc"] >= rows["none"]["acc"] - 0.02
    assert main(["zoo", "repair", str(out), "--methods", "soda", "finetune", "--json", str(tmp_path / "r.json"),
                 "--quiet"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert sorted(r["method"] for r in result["rows"]) == ["finetune", "soda"]
    for r in result["rows"]:
        assert r["model"] == rows["patch"]["key"] and r["asr_before"] == pytest.approx(rows["patch"]["asr"])
        assert 0 <= r["asr_after"] <= 1 and 0 <= r["acc_after"] <= 1
    assert set(result["summary"]) == {"soda", "finetune"} and result["summary"]["soda"]["all"]["n"] == 1
    assert "finetune" in capsys.readouterr().out
    # Each row carries its clean twin's ASR on the same samples (what `soda evaluate` gives), once per twin.
    assert main(["evaluate", "--model", str(out / rows["none"]["file"]), "--dataset", "fmnist", "--data-dir",
                 str(tmp_path / "tiny.npz"), "--attack-file", str(tmp_path / "attacks.json"), "--attack", "patch",
                 "--json", str(tmp_path / "twin.json")]) == 0
    twin_asr = json.loads((tmp_path / "twin.json").read_text())["asr"]
    assert all(r["asr_twin"] == pytest.approx(twin_asr) for r in result["rows"])
    ok = all(r["asr_after"] <= max(0.1, twin_asr) for r in result["rows"] if r["method"] == "soda")
    assert result["summary"]["soda"]["all"]["at_twin"] == float(ok)
    assert len((out / "repairs" / "twin_asr.jsonl").read_text().splitlines()) == 1
    # Cached per model and method: a rerun repairs nothing again.
    assert main(["zoo", "repair", str(out), "--methods", "finetune", "--quiet"]) == 0
    assert len((out / "repairs" / "results-seed0.jsonl").read_text().splitlines()) == 2
    assert main(["zoo", "repair", str(out), "--methods", "nope"]) == 2
    # The repair alone, on the true pair, with a changed setting: its own cache entry.
    assert main(["zoo", "repair", str(out), "--given-pair", "--repair-option", "tune_from=null",
                 "--json", str(tmp_path / "g.json"), "--quiet"]) == 0
    given = json.loads((tmp_path / "g.json").read_text())
    assert given["given_pair"] and given["soda_config"]["tune_from"] is None
    (row,) = given["rows"]
    assert row["detected"] == [rows["patch"]["source"], rows["patch"]["target"]] and row["repaired"]
    assert len((out / "repairs" / "results-seed0-given.jsonl").read_text().splitlines()) == 1
    assert main(["zoo", "repair", str(out), "--repair-option", "nope=1"]) == 2
    # `soda audit --repair` on the same model: detect, then reconstruct and repair the first flagged
    # pair in the worker, on the data the worker already holds (tau 0: the strongest pair is flagged).
    audit = tmp_path / "audit"
    assert main(["audit", str(out / rows["patch"]["file"]), "--dataset", "fmnist", "--data-dir",
                 str(tmp_path / "tiny.npz"), "--attack-file", str(tmp_path / "attacks.json"), "--out", str(audit),
                 "--repair", "--tau-errors", "0", "--recon-steps", "300", "--quiet"]) == 0
    (arow,) = read_jsonl(audit / "audit.jsonl").values()
    assert arow["error"] == "" and arow["pairs"] and "error" not in arow["repair"], arow
    assert Path(arow["repair"]["model"]).is_file()
    assert arow["repair"]["asr_before"] == pytest.approx(rows["patch"]["asr"])


def test_repair_cli_baseline_method(tmp_path: Path, capsys) -> None:
    spec = load_zoo_spec(_tiny_zoo_files(tmp_path, recipe="epochs = 20\naugment_clean = false"))
    out = tmp_path / "zoo"
    build_zoo(spec, out)
    bad = next(r for r in read_manifest(out).values() if r["attack"] == "patch")
    common = ["--model", str(out / bad["file"]), "--data-dir", str(tmp_path / "tiny.npz"),
              "--attack-file", str(tmp_path / "attacks.json")]
    assert main(["repair", *common, "--method", "finetune", "--out", str(tmp_path / "ft.safetensors"),
                 "--json", str(tmp_path / "ft.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "ft.json").read_text())
    assert res["method"] == "finetune" and res["asr_before"] == pytest.approx(bad["asr"])
    assert 0 <= res["asr_after"] <= 1 and res["rasr_after"] is None and (tmp_path / "ft.safetensors").is_file()
    assert "repaired by finetune" in capsys.readouterr().out
    # soda's repair needs the pair and the samples: one line naming what is missing
    assert main(["repair", *common, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--method soda needs --source, --target, --samples" in capsys.readouterr().err


def test_report_says_what_the_feature_guard_decided() -> None:
    from soda_backdoor.reporting.report import _feature_guard_line

    assert _feature_guard_line({"feature_guard_loss": None, "config": {"feature_guard": 1.5}}) == ""
    kept = _feature_guard_line({"feature_guard_loss": 0.4, "feature_fallback": False, "config": {"feature_guard": 1.5}})
    dropped = _feature_guard_line({"feature_guard_loss": 2.7, "feature_fallback": True, "config": {"feature_guard": 1.5}})
    assert "0.40" in kept and "kept" in kept and "2.70" in dropped and "without them" in dropped


def test_repair_verdict_says_when_the_repair_is_partial() -> None:
    from soda_backdoor.reporting.report import repair_verdict

    base = {"acc_before": 0.90, "acc_after": 0.893, "asr_before": 0.94, "rasr_before": 1.0, "rasr_after": 0.0,
            "n_semantic": 18}
    assert repair_verdict({**base, "asr_after": 0.056}).startswith("Repaired:")
    partial = repair_verdict({**base, "asr_after": 0.5})
    assert partial.startswith("Partial repair: 0.50 of the real semantic test samples") and "0.7 points" in partial
    assert "not measured" in repair_verdict({**base, "asr_after": 0.0, "n_semantic": 0})


@pytest.mark.parametrize("roles", [("clean", "clean"), ("clean", "backdoored")])
def test_roc_plot_without_warnings(tmp_path: Path, roles) -> None:
    # A zoo of one role has no ROC: the plot says so instead of warning about an empty legend.
    import warnings

    from soda_backdoor.zoo.score import ZooScore, group_score, plot_roc

    rows = [{"role": r, "score": float(i), "flagged": bool(i), "target_found": bool(i), "source_found": bool(i)}
            for i, r in enumerate(roles)]
    score = ZooScore("soda", str(tmp_path / "z"), group_score(rows), {}, rows, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_roc(score, tmp_path / "roc.png").is_file()
