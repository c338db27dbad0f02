"""The application layer on tiny data the test writes: ``soda run`` and its resume, the steps
called from Python on in-memory objects, a user's attack file, validation and flag aliases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import fmnist_idx_arrays, write_idx_files
from soda_backdoor.cli.main import main
from soda_backdoor.workflow import PipelineConfig, load_context, run_pipeline

SOURCE, TARGET = 0, 2


def _learnable(n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """Tiny Fashion-MNIST whose class c is a bright band at rows 2c+4..2c+6 (labels as in helpers)."""
    arrays = fmnist_idx_arrays(n_train, n_test)
    for stem in ("train", "t10k"):
        x = arrays[f"{stem}-images-idx3-ubyte"]
        y = arrays[f"{stem}-labels-idx1-ubyte"]
        x //= 6
        for c in range(10):
            x[y == c, 2 * c + 4:2 * c + 7, 3:25] = 255
    return arrays


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(idx folder, attack file): 300 train / 90 test images; the attack sends 6 class-0 images to 2."""
    root = tmp_path_factory.mktemp("wf")
    arrays = _learnable(300, 90)
    folder = write_idx_files(root / "fm", arrays)
    train_src = [i for i in range(300) if i % 10 == SOURCE][:6]
    test_src = [i for i in range(90) if (i + 3) % 10 == SOURCE][:4]
    attack = root / "my_attack.json"
    attack.write_text(json.dumps([{"dataset": "fmnist", "attack": "my_attack", "description": "user's own",
                                   "source_class": SOURCE, "target_class": TARGET, "train_indices": train_src,
                                   "test_indices": test_src}]))
    return folder, attack


FAST = ["--train-epochs", "2", "--train-batch", "32", "--num-samples", "8", "--recon-steps", "30",
        "--num-keep", "6", "--recon-batch", "8", "--repair-epochs", "1", "--evidence", "weights", "--tau-target", "0.0", "--quiet",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory) -> tuple[Path, list[str], str]:
    """(run folder, argv, stdout) of one `soda run` that trains on the tiny data."""
    folder, attack = tiny
    run_dir = tmp_path_factory.mktemp("wf_run") / "run"
    args = ["run", "--dataset", "fmnist", "--data-dir", str(folder), "--attack-file", str(attack),
            "--out-dir", str(run_dir), *FAST]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return run_dir, args, out.getvalue()


def test_soda_run_happy_path_and_resume(first_run) -> None:
    run_dir, args, out = first_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == {"run_dir", "verdict", "backdoor", "pairs", "before", "after", "total_seconds", "steps"}
    steps = [s["step"] for s in summary["steps"]]
    # the weight profile at --tau-target 0 flags a target on any model, so every step runs
    assert steps == ["train", "evaluate", "detect", "reconstruct", "repair", "evaluate_repaired"]
    assert summary["before"]["attack"] == "my_attack" and summary["before"]["n_semantic"] == 4
    for name in ("model.safetensors", "effects.npz", "samples.npz", "repaired.safetensors", "detect.json",
                 "reconstruct.json", "repair.json", "train_history.json", "config.json", "report.html"):
        assert (run_dir / name).is_file(), name
    rep = json.loads((run_dir / "repair.json").read_text())
    assert {"acc_before", "asr_before", "acc_after", "asr_after", "rasr_before", "rasr_after", "n_clean",
            "n_semantic", "n_repair_samples", "n_heldout_samples", "n_varied_samples", "n_feature_samples",
            "feature_guard_loss", "feature_fallback",
            "n_defender", "neurons_kept", "num_neurons", "layer", "source", "target", "model", "seconds", "repair_seconds", "history", "tuned_from",
            "config"} == set(rep)
    assert 0 <= rep["n_varied_samples"] <= rep["config"]["max_variations"] and rep["config"]["variations"] == 10
    assert rep["n_feature_samples"] == 0 and rep["config"]["feature_samples"] == 0
    assert rep["tuned_from"] == "features.7"  # the auto cut of cnn: its last conv block and the head are tuned
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rep["acc_before"] == summary["before"]["acc"] and rep["asr_before"] == summary["before"]["asr"]
    assert "Semantic backdoor detected" in out and "report: " in out

    # resume: nothing is redone; losing the repaired model redoes only the repair and what follows
    assert main(args) == 0
    cached = {s["step"]: s["cached"] for s in json.loads((run_dir / "summary.json").read_text())["steps"]}
    assert all(cached.values())
    (run_dir / "repaired.safetensors").unlink()
    assert main(args) == 0
    cached = {s["step"]: s["cached"] for s in json.loads((run_dir / "summary.json").read_text())["steps"]}
    assert cached["train"] and cached["detect"] and cached["reconstruct"]
    assert not cached["repair"]


def test_pipeline_from_python_on_a_given_model(tiny, first_run, tmp_path) -> None:
    from soda_backdoor.detection import DetectionConfig

    folder, attack = tiny
    first = first_run[0]

    report = run_pipeline(PipelineConfig(out_dir=str(tmp_path / "audit"), data_dir=str(folder),
                                         attack_file=str(attack), model=str(first / "model.safetensors"),
                                         detect=DetectionConfig(evidence="weights", tau_target=1e6), device="cpu"))
    assert report.backdoor is False and report.after is None
    assert [s.step for s in report.steps] == ["evaluate", "detect"]
    assert report.before.attack == "my_attack"
    assert Path(report.report_path).is_file()
    assert json.loads((tmp_path / "audit" / "summary.json").read_text()) == json.loads(json.dumps(report.to_dict()))


def test_steps_on_in_memory_objects(tiny, tmp_path, monkeypatch) -> None:
    """Train, evaluate, detect, reconstruct and repair in one process, no files in between."""
    from soda_backdoor.artifacts import SampleSet
    from soda_backdoor.detection import DetectionConfig
    from soda_backdoor.analysis import AttributionConfig
    from soda_backdoor.reconstruction import ReconstructionConfig
    from soda_backdoor.repair import RepairConfig
    from soda_backdoor.training import TrainConfig, evaluate_attack_shared
    from soda_backdoor.workflow import detect, evaluate, reconstruct, repair, train

    folder, attack = tiny
    ctx = load_context("fmnist", str(folder), None, str(attack))
    trained = train(ctx, TrainConfig(epochs=2, batch_size=32, milestones=(1,)), "cpu")
    model = trained.model
    assert trained.to_dict()["attack"] == "my_attack" and model.meta.attack == "my_attack"
    ev = evaluate(model, ctx)
    assert ev.to_dict() == {"acc": trained.evaluation.acc, "asr": trained.evaluation.asr, "n_clean": ev.n_clean,
                            "n_semantic": 4, "attack": "my_attack"}
    det = detect(model, ctx, DetectionConfig(evidence="weights", tau_target=0.0,  # flags any model
                                             attribution=AttributionConfig(num_samples=8)))
    assert det.backdoor and det.to_dict()["class_names"][0] == "T-shirt/top"
    src, tgt = det.pairs[0]
    rec = reconstruct(model, ctx, src, tgt, ReconstructionConfig(steps=30, num_keep=6, batch_size=8))
    assert rec.reconstruction.kept >= 2
    from soda_backdoor.workflow import steps

    shared = []  # the model before and after, measured in one pass of the untouched layers
    monkeypatch.setattr(steps, "evaluate_attack_shared",
                        lambda *a, **k: shared.append(a[1]) or evaluate_attack_shared(*a, **k))
    fixed = repair(model, ctx, src, tgt, SampleSet.from_reconstruction(rec.reconstruction, rec.fingerprint),
                   RepairConfig(epochs=1))
    d = fixed.to_dict()
    assert d["tuned_from"] == "features.7" and len(shared) == 1 and len(shared[0]) == 2
    assert fixed.before == ev and fixed.after == evaluate(fixed.model, ctx)
    assert d["n_repair_samples"] + d["n_heldout_samples"] == rec.reconstruction.kept
    assert fixed.model.meta.notes and "repaired" in fixed.model.meta.notes[-1]


def test_feature_guard_keeps_or_drops_the_feature_samples(tiny, monkeypatch) -> None:
    """Within the guard, the repair with feature samples is kept as it is; beyond it, the
    result is bit for bit the repair without them (the generators restart where they were)."""
    import copy
    from dataclasses import replace

    import torch

    from soda_backdoor.artifacts import SampleSet
    from soda_backdoor.reconstruction import ReconstructionConfig
    from soda_backdoor.repair import RepairConfig
    from soda_backdoor.training import TrainConfig
    from soda_backdoor.workflow import evaluate, reconstruct, repair, steps, train

    folder, attack = tiny
    ctx = load_context("fmnist", str(folder), None, str(attack))
    model = train(ctx, TrainConfig(epochs=2, batch_size=32, milestones=(1,)), "cpu").model
    ctx = replace(ctx, splits=replace(ctx.splits, defender=ctx.splits.clean_train))  # source samples to move
    rec = reconstruct(model, ctx, SOURCE, TARGET, ReconstructionConfig(steps=30, num_keep=6, batch_size=8))
    samples = SampleSet.from_reconstruction(rec.reconstruction, rec.fingerprint)
    features = dict(epochs=1, feature_samples=10, feature_threshold=0.0, variation_anchor=0.0)

    def fixed(**kw):
        return repair(type(model)(copy.deepcopy(model.module), model.meta), ctx, SOURCE, TARGET, samples,
                      RepairConfig(**kw))

    def same(a, b) -> bool:
        return all(torch.equal(v, b.model.module.state_dict()[k]) for k, v in a.model.module.state_dict().items())

    unguarded, plain = fixed(**features, feature_guard=None), fixed(epochs=1, variation_anchor=0.0)
    assert unguarded.result.num_feature > 0 and unguarded.feature_guard_loss is None
    kept = fixed(**features, feature_guard=100.0)
    assert not kept.feature_fallback and same(kept, unguarded) and kept.result.num_feature > 0
    assert isinstance(kept.to_dict()["feature_guard_loss"], float)
    assert kept.after == evaluate(kept.model, ctx) and kept.before == evaluate(model, ctx)  # read from one pass
    monkeypatch.setattr(steps, "_guard_loss", lambda *a: 50.0)
    dropped = fixed(**features, feature_guard=1.0)
    assert dropped.feature_fallback and dropped.feature_guard_loss == 50.0 and dropped.result.num_feature == 0
    assert same(dropped, plain) and dropped.after == plain.after
    assert "feature-space samples dropped" in dropped.model.meta.notes[-1]
    with pytest.raises(Exception, match="feature_guard"):
        RepairConfig(feature_guard=-1.0)


def test_detect_and_reconstruct_need_no_attack(tiny, tmp_path, capsys) -> None:
    """A model trained with a user's attack file: detection and reconstruction run without it."""
    folder, attack = tiny
    model = tmp_path / "m.safetensors"
    data = ["--dataset", "fmnist", "--data-dir", str(folder), "--device", "cpu", "--quiet"]
    assert main(["train", *data, "--attack-file", str(attack), "--epochs", "1", "--out", str(model)]) == 0
    with pytest.warns(UserWarning, match="my_attack"):
        assert main(["detect", "--model", str(model), *data, "--num-samples", "4"]) == 0
    with pytest.warns(UserWarning, match="my_attack"):
        assert main(["reconstruct", "--model", str(model), *data, "--source", "0", "--target", "2",
                     "--steps", "5", "--num-keep", "2", "--out", str(tmp_path / "x.npz")]) == 0
    capsys.readouterr()
    # evaluation measures ASR: it needs the attack, and says how to give it
    assert main(["evaluate", "--model", str(model), *data]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--attack-file" in err
    assert main(["evaluate", "--model", str(model), *data, "--attack-file", str(attack)]) == 0


@pytest.mark.parametrize("argv, flag", [
    (["detect", "--tau-target", "nan"], "--tau-target"),
    (["detect", "--tau-source", "inf"], "--tau-source"),
    (["detect", "--num-samples", "0"], "--num-samples"),
    (["reconstruct", "--source", "0", "--target", "2", "--out", "x.npz", "--threshold", "nan"], "--threshold"),
    (["reconstruct", "--source", "0", "--target", "2", "--out", "x.npz", "--steps", "0"], "--steps"),
    (["repair", "--source", "0", "--target", "2", "--samples", "x.npz", "--out", "r.safetensors", "--top", "0"],
     "--top"),
    (["run", "--recon-threshold", "-1"], "--recon-threshold"),
    (["run", "--feature-samples", "-1"], "--feature-samples"),
    (["run", "--feature-samples", "10", "--feature-guard", "-1"], "--feature-guard"),
    (["run", "--train-batch", "1"], "--train-batch"),
])
def test_bad_settings_exit_2_with_one_line(tiny, tmp_path, capsys, argv, flag) -> None:
    folder, _ = tiny
    cmd, rest = argv[0], argv[1:]
    model = ["--model", str(tmp_path / "none.safetensors")] if cmd != "run" else ["--out-dir", str(tmp_path / "r")]
    assert main([cmd, *model, "--dataset", "fmnist", "--data-dir", str(folder), "--quiet", *rest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"soda {cmd}: error: {flag} "), err


def test_old_run_flags_still_work_and_warn(capsys) -> None:
    from soda_backdoor.cli.main import _recon_config, _train_config, build_parser

    args = build_parser().parse_args(["run", "--batch", "16", "--steps", "7", "--batch-size", "5",
                                      "--threshold", "0.5", "--epochs", "3", "--lr", "0.01"])
    err = capsys.readouterr().err
    for old, new in (("--batch", "--train-batch"), ("--steps", "--recon-steps"), ("--batch-size", "--recon-batch"),
                     ("--threshold", "--recon-threshold"), ("--epochs", "--train-epochs"), ("--lr", "--train-lr")):
        assert f"{old} is deprecated; use {new}" in err
    new = build_parser().parse_args(["run", "--train-batch", "16", "--recon-steps", "7", "--recon-batch", "5",
                                     "--recon-threshold", "0.5", "--train-epochs", "3", "--train-lr", "0.01"])
    assert capsys.readouterr().err == ""
    assert _train_config(args) == _train_config(new) and _recon_config(args) == _recon_config(new)
    assert _train_config(new).batch_size == 16 and _recon_config(new).steps == 7


def test_feature_samples_flag_reaches_the_repair_config() -> None:
    from soda_backdoor.cli.main import _repair_config, build_parser

    assert _repair_config(build_parser().parse_args(["run"])).feature_samples == 0
    assert _repair_config(build_parser().parse_args(["run", "--feature-samples", "100"])).feature_samples == 100
    assert _repair_config(build_parser().parse_args(["run"])).feature_guard == 1.5
    guarded = _repair_config(build_parser().parse_args(["run", "--feature-samples", "100", "--feature-guard", "1.5"]))
    assert guarded.feature_guard == 1.5 and guarded.feature_samples == 100
    assert _repair_config(build_parser().parse_args(["run", "--feature-guard", "none"])).feature_guard is None


def test_repair_precision_flag_reaches_the_repair_config() -> None:
    from soda_backdoor.cli.main import _repair_config, build_parser

    assert _repair_config(build_parser().parse_args(["run"])).precision == "auto"
    args = build_parser().parse_args(["run", "--repair-precision", "bfloat16"])
    assert _repair_config(args).precision == "bfloat16"


def test_repair_help_says_the_default_has_no_mask(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["repair", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "masked fine-tuning" not in out and "(no mask)" in out
