"""The confident-error evidence: counting, the Poisson null, references, and the verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from soda_backdoor.detection.errors import (ErrorConfig, ErrorCounts, ErrorReference, build_reference,
                                            confident_errors, detect_errors, error_evidence, shipped_reference)
from soda_backdoor.errors import UserInputError

K = 4


def _counts(pairs: dict[tuple[int, int], int], per_class: int = 1000, threshold: float = 0.95) -> ErrorCounts:
    c = [[0] * K for _ in range(K)]
    for (s, t), n in pairs.items():
        c[s][t] = n
    return ErrorCounts(tuple(map(tuple, c)), (per_class,) * K, threshold)


def _reference(models: list[ErrorCounts], arch: str = "cnn") -> ErrorReference:
    return build_reference([(m, arch, f"m{i}") for i, m in enumerate(models)], "fmnist", {"zoos": ["t"]})


def test_counts_only_errors_at_or_above_the_threshold() -> None:
    # logits in, so softmax probabilities are exactly what we set
    p = torch.tensor([[0.01, 0.97, 0.01, 0.01],   # class 0 given 1, confident
                      [0.01, 0.94, 0.04, 0.01],   # class 0 given 1, not confident enough
                      [0.97, 0.01, 0.01, 0.01],   # class 0 right: never an error
                      [0.01, 0.01, 0.01, 0.97]])  # class 2 given 3
    y = torch.tensor([0, 0, 0, 2])
    c = confident_errors(nn.Identity(), p.log(), y, K, 0.95)
    assert c.counts[0][1] == 1 and c.counts[2][3] == 1 and sum(map(sum, c.counts)) == 2
    assert c.totals == (3, 0, 1, 0) and c.threshold == 0.95
    with pytest.raises(UserInputError, match="in \\(0, 1\\)"):
        confident_errors(nn.Identity(), p.log(), y, K, 1.0)


def test_evidence_is_the_poisson_tail_under_the_reference_rate() -> None:
    ref = _reference([_counts({(1, 2): 10}), _counts({(1, 2): 14})]).entry("cnn")
    e = error_evidence(_counts({(1, 2): 12, (0, 3): 5}), ref, prior=0.5)
    # (1, 2): rate (24 + 0.5) / 2000 per sample, 1000 samples: 12 errors are what the references make
    assert e[1, 2] < 0.5
    # (0, 3): the references never make it, rate 0.5 / 2000: five errors are about 1e-9 rare
    lam = 0.25
    tail = 1 - sum(math.exp(-lam) * lam ** k / math.factorial(k) for k in range(5))
    assert e[0, 3] == pytest.approx(-math.log10(tail), rel=1e-6)
    assert (e.diagonal() == 0).all() and e[2, 1] == 0  # no errors: no evidence


def test_evidence_stays_finite_where_the_tail_underflows() -> None:
    """A pair far beyond its null gets the cap, not infinity (JSON, ROC and calibration need it)."""
    from soda_backdoor.detection.errors import EVIDENCE_CAP, error_evidence

    ref = build_reference([(_counts({}, per_class=1000), "cnn", "r")], "fmnist").entry("cnn")
    e = error_evidence(_counts({(0, 2): 1000}, per_class=1000), ref, prior=0.5)
    assert float(e[0, 2]) == EVIDENCE_CAP and torch.isfinite(e).all()


def test_a_model_confident_everywhere_raises_its_null_but_not_its_backdoors() -> None:
    ref = _reference([_counts({(0, 1): 10, (1, 2): 10, (2, 3): 10, (3, 0): 10})] * 2).entry("cnn")
    base = {(0, 1): 10, (1, 2): 10, (2, 3): 10, (3, 0): 10}
    twice = {p: 2 * n for p, n in base.items()}
    # twice the reference's errors on every pair: the plain null calls each pair rare, the
    # factor (about 2, from the errors into the other classes) explains them
    plain = error_evidence(_counts(twice), ref, prior=0.5)
    scaled = error_evidence(_counts(twice), ref, prior=0.5, exposure=0.0)
    assert plain.max() > 2 and scaled.max() < 0.5
    # a backdoor into class 3 does not raise the factor of target 3: its pair keeps its evidence
    bd = dict(base) | {(0, 3): 25}
    assert error_evidence(_counts(bd), ref, 0.5, 0.0)[0, 3] == pytest.approx(error_evidence(_counts(bd), ref, 0.5)[0, 3])
    # a model less confident than the references is not made more suspicious (k >= 1)
    half = {p: n // 2 for p, n in base.items()} | {(0, 3): 6}
    assert error_evidence(_counts(half), ref, 0.5, 0.0)[0, 3] == pytest.approx(error_evidence(_counts(half), ref, 0.5)[0, 3])
    with pytest.raises(UserInputError, match="exposure"):
        ErrorConfig(exposure=-1.0)


def test_nbpair_null_widens_the_pairs_that_vary_with_the_recipe() -> None:
    # two reference recipes: one confuses 1 -> 2 a lot, one hardly at all; 3 -> 0 is steady
    loud, quiet = {(1, 2): 40, (3, 0): 5}, {(1, 2): 2, (3, 0): 5}
    ref = _reference([_counts(loud), _counts(loud), _counts(quiet), _counts(quiet)]).entry("cnn")
    assert ref.per_model and len(ref.model_counts) == 4
    # a clean model of the loud recipe: the Poisson null at the pooled rate (21) calls 1 -> 2
    # rare, the per-pair spread of the references does not
    model = _counts({(1, 2): 42, (3, 0): 5})
    poisson = error_evidence(model, ref, 0.5)
    nbpair = error_evidence(model, ref, 0.5, null="nbpair")
    assert poisson[1, 2] > 4 and nbpair[1, 2] < 1
    # a backdoor on a pair the references never confuse keeps its evidence
    bd = _counts({(1, 2): 2, (3, 0): 5, (0, 3): 30})
    assert error_evidence(bd, ref, 0.5, null="nbpair")[0, 3] > 10
    assert detect_errors(bd, ref, ErrorConfig()).pairs[0] == (0, 3)
    # without each model's counts (an older reference file): the Poisson null, with a note
    old = type(ref)(ref.arch, ref.counts, ref.totals, ref.num_models, ref.models)
    assert not old.per_model and (error_evidence(model, old, 0.5, null="nbpair") == poisson).all()
    assert "keeps no per-model counts" in detect_errors(bd, old, ErrorConfig()).note
    with pytest.raises(UserInputError, match="unknown confident-error null"):
        ErrorConfig(null="gamma")
    with pytest.raises(UserInputError, match="shrink"):
        ErrorConfig(shrink=-1.0)


def test_verdict_flags_the_pair_the_references_cannot_explain() -> None:
    ref = _reference([_counts({(1, 2): 10}), _counts({(1, 2): 12})]).entry("cnn")
    bad = detect_errors(_counts({(1, 2): 11, (0, 3): 12}), ref, ErrorConfig(tau=6.0))
    assert bad.backdoor and bad.pairs == ((0, 3),) and bad.score == max(bad.class_scores) > 6
    assert bad.class_scores[3] == bad.score and bad.reference == "cnn (2 clean models)"
    clean = detect_errors(_counts({(1, 2): 13, (0, 3): 1}), ref, ErrorConfig(tau=6.0))
    assert not clean.backdoor and clean.pairs == () and clean.score < 6
    d = bad.to_dict()
    assert d["pairs"] == [{"source": 0, "target": 3}] and json.dumps(d)


def test_reference_round_trip_and_fallbacks(tmp_path: Path) -> None:
    ref = build_reference([(_counts({(1, 2): 3}), "cnn", "a"), (_counts({(1, 2): 5}), "cnn", "b"),
                           (_counts({(0, 1): 7}), "lenet", "c")], "fmnist", {"zoos": ["ref"]})
    assert ref.archs == ("cnn", "lenet") and ref.entry("cnn").counts[1][2] == 8 and ref.entry("cnn").num_models == 2
    back = ErrorReference.load(ref.save(tmp_path / "r.json"))
    assert back == ref and back.entry("cnn").model_counts[1][1][2] == 5
    broken = ref.to_dict()
    broken["entries"][0]["model_counts"] = broken["entries"][0]["model_counts"][:1]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(UserInputError, match="per-model counts of cnn do not match its 2 models"):
        ErrorReference.load(tmp_path / "broken.json")
    own, note = ref.for_model("lenet", "fmnist")
    assert own.arch == "lenet" and note == ""
    pooled, note = ref.for_model("resnet18", "fmnist")
    assert pooled.num_models == 3 and pooled.counts[0][1] == 7 and pooled.counts[1][2] == 8 and pooled.per_model
    assert "no confident-error reference for arch resnet18 on fmnist" in note and "3 clean reference models" in note
    none, note = ref.for_model("cnn", "cifar10")
    assert none is None and "no confident-error reference for dataset cifar10" in note
    (tmp_path / "bad.json").write_text(json.dumps({"format": "soda-calibration/1"}))
    with pytest.raises(UserInputError, match="not a confident-error reference"):
        ErrorReference.load(tmp_path / "bad.json")
    with pytest.raises(UserInputError, match="does not exist"):
        ErrorReference.load(tmp_path / "missing.json")
    with pytest.raises(UserInputError, match="different thresholds"):
        build_reference([(_counts({}), "cnn", "a"), (_counts({}, threshold=0.9), "cnn", "b")], "fmnist")


def test_the_shipped_reference_covers_the_default_architectures() -> None:
    ref = shipped_reference()
    assert ref.dataset == "fmnist" and {"cnn", "lenet"} <= set(ref.archs)
    assert all(e.num_models >= 4 and sum(e.totals) >= 10000 * e.num_models for e in ref.entries)
    assert ref.provenance["zoos"] == ["reference", "reference_flip", "reference_wide", "reference_wide2"]
    assert ref.threshold == 0.95 and ref.provenance["num_models"] == 71
    # the variation rates ship beside the counts: the largest of the 39 random-recipe models
    assert ref.variations is not None and ref.variations.num_models == 39 and ref.variations.dataset == "fmnist"
    assert all(e.per_model for e in ref.entries)  # the default nbpair null needs each model's counts


def test_zoo_reference_then_detect_with_it_and_without_one(tmp_path: Path, capsys) -> None:
    """`soda zoo reference` from a zoo's clean model; `soda detect --reference` with it, on the
    reference's arch, on another arch (pooled, with a note) and on another dataset (fallback)."""
    from helpers import save_cnn
    from test_model_zoo import _tiny_zoo_files

    from soda_backdoor.cli.main import main
    from soda_backdoor.zoo import build_zoo, load_zoo_spec, read_manifest

    zoo = tmp_path / "zoo"
    # a patch model and its clean twin, trained until they learn the classes (a clean model whose
    # training failed, accuracy < 0.5, is left out of a reference)
    build_zoo(load_zoo_spec(_tiny_zoo_files(tmp_path, recipe="epochs = 20\naugment_clean = false")), zoo)
    ref_path = tmp_path / "ref.json"
    assert main(["zoo", "reference", str(zoo), "--out", str(ref_path), "--threshold", "0.5", "--quiet"]) == 0
    assert "lenet: 1 clean model(s)" in capsys.readouterr().out
    ref = ErrorReference.load(ref_path)
    assert ref.threshold == 0.5 and ref.archs == ("lenet",) and ref.entries[0].totals == (20,) * 10
    assert ref.provenance["zoos"] == ["zoo"] and ref.provenance["num_models"] == 1
    assert ref.provenance["left_out_failed_training"] == [] and ref.provenance["recalibrate_bn"] is True
    # the same clean models' variation rates, the null of the variation evidence
    v = ref.variations
    assert v.dataset == "fmnist" and (v.copies, v.anchor, v.num_models) == (10, 0.95, 1)
    assert len(v.rate_max) == 10 and all(len(r) == 10 and all(0.0 <= x <= 1.0 for x in r) for r in v.rate_max)
    assert ErrorReference.load(ref_path) == ref  # both parts round-trip
    assert main(["zoo", "reference", str(zoo), "--out", str(tmp_path / "nov.json"), "--threshold", "0.5",
                 "--variation-copies", "0", "--quiet"]) == 0
    nov = ErrorReference.load(tmp_path / "nov.json")
    assert nov.variations is None and nov.entries == ref.entries
    # a clean model whose training failed is left out (here the only one: no reference)
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "manifest.jsonl").write_text("".join(
        json.dumps(dict(r, acc=0.1) if r["attack"] == "none" else r) + "\n" for r in read_manifest(zoo).values()))
    assert main(["zoo", "reference", str(failed), "--out", str(tmp_path / "f.json"), "--quiet"]) == 2
    assert "no clean model whose training worked" in capsys.readouterr().err

    data = ["--dataset", "fmnist", "--data-dir", str(tmp_path / "tiny.npz"), "--num-samples", "8", "--device", "cpu",
            "--quiet", "--json", str(tmp_path / "d.json")]
    model = next(zoo / r["file"] for r in read_manifest(zoo).values() if r["attack"] == "patch")
    assert main(["detect", "--model", str(model), "--reference", str(ref_path), *data]) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["evidence"] == "errors" and res["errors"]["reference"] == "lenet (1 clean models)"
    assert res["note"] == "" and res["errors"]["counts"]["threshold"] == 0.5
    assert res["errors"]["variation_excess"] is not None  # against the reference's own variation rates
    assert res["backdoor"] == bool(res["pairs"]) and "weight_profile" in res
    out = capsys.readouterr().out
    assert "confident errors (softmax >= 0.5)" in out and out.count("VERDICT:") == 1  # one verdict, the errors'
    assert res["errors"]["config"]["null"] == "nbpair"
    assert main(["detect", "--model", str(model), "--reference", str(ref_path), "--errors-null", "poisson",
                 "--tau-errors", "2.45", *data]) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["errors"]["config"]["null"] == "poisson" and res["errors"]["config"]["tau"] == 2.45
    assert "Poisson null" in capsys.readouterr().out

    # a reference without variation rates (a file from before them): the shipped ones, with a note
    assert main(["detect", "--model", str(model), "--reference", str(tmp_path / "nov.json"), *data]) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert "holds no variation rates" in res["note"] and res["errors"]["variation_excess"] is not None
    capsys.readouterr()

    cnn = save_cnn(tmp_path / "cnn.safetensors")  # an architecture the reference does not have
    # counted with batch norm re-estimated (the default), the reference says so; a detection
    # without it gets a note
    assert main(["detect", "--model", str(model), "--reference", str(ref_path), "--no-recalibrate-bn", *data]) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["errors"]["config"]["recalibrate_bn"] is False
    assert "reference counted its models' errors with re-estimated batch-norm statistics" in res["note"]
    capsys.readouterr()

    assert main(["detect", "--model", str(cnn), "--reference", str(ref_path), *data]) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["evidence"] == "errors" and "no confident-error reference for arch cnn on fmnist" in res["note"]
    assert "no variation rates of clean cnn models: compared with those of lenet" in res["note"]
    assert "note: no confident-error reference for arch cnn" in capsys.readouterr().out

    other = build_reference([(_counts({}, per_class=5), "cnn", "x")], "cifar10")  # another dataset
    other.save(tmp_path / "cifar.json")
    with pytest.warns(UserWarning, match="no confident-error reference for dataset fmnist.*weight profile"):
        assert main(["detect", "--model", str(cnn), "--reference", str(tmp_path / "cifar.json"), *data]) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["evidence"] == "weights" and res["errors"] is None and "weight profile" in res["note"]
    assert main(["detect", "--model", str(cnn), "--reference", str(tmp_path / "nope.json"), *data]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recalibrated_batchnorm_re_estimates_the_statistics_and_nothing_else() -> None:
    """The copy's running statistics are the data's; weights, the original and a model without
    batch norm are untouched."""
    from soda_backdoor.utils import recalibrated_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).eval()
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as after a training that saw other data
    bn.running_var.fill_(9.0)
    x = torch.randn(130, 1, 2, 2) * 2 + 1
    new = recalibrated_batchnorm(model, x, batch_size=64)
    assert new is not model and not new.training and new[1].momentum == bn.momentum
    feats = model[0](x).transpose(0, 1).flatten(1)
    assert torch.allclose(new[1].running_mean, feats.mean(1), atol=2e-3)  # batches of 44, 43, 43
    assert torch.allclose(new[1].running_var, feats.var(1), rtol=0.05)  # averaged over batches
    assert bn.running_mean.eq(5.0).all() and bn.running_var.eq(9.0).all()  # the original unchanged
    for p, q in zip(model.parameters(), new.parameters()):
        assert torch.equal(p, q)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert recalibrated_batchnorm(plain, x) is plain
    with pytest.raises(UserInputError, match="at least 2 samples"):
        recalibrated_batchnorm(model, x[:1])


class _DarkToTwo(nn.Module):
    """Class 2 for a dark image (mean pixel < 0.3 in [0, 1]), else the class its brightness says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        dark = m < 0.3
        out = torch.full((len(x), K), -10.0)
        out[:, 0] = torch.where(dark, -10.0, 10.0)  # everything bright enough is class 0
        out[:, 2] = torch.where(dark, 10.0, -10.0)
        return out


def test_variation_rates_count_the_varied_copies_each_class_sends_elsewhere() -> None:
    from soda_backdoor.detection.variations import variation_rates

    x = torch.full((40, 1, 28, 28), 0.45)
    y = torch.zeros(40, dtype=torch.long)
    y[30:] = 1  # class 1: the model never gives it its own class, so none is anchored
    rate, anchored = variation_rates(_DarkToTwo(), x, y, K, copies=5, anchor=0.95, normalize=lambda v: v,
                                     gen=torch.Generator().manual_seed(0))
    assert anchored.tolist() == [30, 0, 0, 0]
    assert 0 < rate[0, 2] < 1 and rate[0, 0] + rate[0, 2] == pytest.approx(1.0)  # darkened copies go to 2
    assert rate[1].sum() == 0 and rate[2].sum() == 0


def test_variation_evidence_flags_a_target_the_errors_miss_with_the_variations_source() -> None:
    from soda_backdoor.detection.variations import VariationReference, variation_excess

    ref_models = [_counts({(1, 2): 5, (3, 2): 1})] * 3
    entry = _reference(ref_models).entry("cnn")
    counts = _counts({(1, 2): 6, (3, 2): 1})  # a weak backdoor into 2: the errors are within their null
    rates = torch.zeros(K, K)
    rates[3, 2] = 0.5  # the variations of class 3 reach 2 most (its property is the backdoor's)
    rates[1, 2] = 0.3
    ref = VariationReference("fmnist", 10, 0.95, tuple((0.05,) * K for _ in range(K)), 3)
    v = variation_excess(rates, ref)
    off = detect_errors(counts, entry, ErrorConfig(variation_tau=0.0), variations=v)
    assert not off.backdoor and off.variation_excess is None  # tau 0: off
    on = detect_errors(counts, entry, ErrorConfig(), variations=v)  # the default, 0.23
    # the target and its source from the variations: the errors' largest into 2 (1 -> 2, 6 against
    # 5 expected) is within their null and names nothing
    assert on.backdoor and on.pairs == ((3, 2),)
    # a target that both flag keeps the errors' source, whatever the variations say
    both = detect_errors(_counts({(1, 2): 40, (3, 2): 1}), entry, ErrorConfig(), variations=v)
    assert both.pairs == ((1, 2),)
    assert on.score == pytest.approx(2.99 * 0.45 / 0.23) and on.class_scores[2] == pytest.approx(on.score)
    assert not detect_errors(counts, entry, ErrorConfig(variation_tau=0.5), variations=v).backdoor
    assert on.variation_excess[3][2] == pytest.approx(0.45) and on.variation_excess[2][2] == 0.0
    with pytest.raises(UserInputError, match="variation_tau"):
        ErrorConfig(variation_tau=-0.1)
    with pytest.raises(UserInputError, match="tau must be >= 0"):
        ErrorConfig(tau=-1.0)
    # a target that the variations flag and no confident error reaches: the variations' source
    rates0 = torch.zeros(K, K)
    rates0[3, 0] = 0.5
    none = detect_errors(_counts({}), entry, ErrorConfig(), variations=variation_excess(rates0, ref))
    assert none.backdoor and none.pairs == ((3, 0),)


def test_variation_reference_loads_and_refuses_a_bad_file() -> None:
    from soda_backdoor.detection.variations import VariationReference, shipped_variation_reference

    ref = shipped_variation_reference()
    assert ref.dataset == "fmnist" and len(ref.rate_max) == 10 and ref.num_models >= 10
    assert VariationReference.from_dict(ref.to_dict()) == ref
    with pytest.raises(UserInputError, match="not a variation reference"):
        VariationReference.from_dict({"format": "x"})
    with pytest.raises(UserInputError, match="square"):
        VariationReference.from_dict({**ref.to_dict(), "rate_max": [[0.1, 0.2]]})


def test_the_report_names_a_pair_under_the_threshold_where_low_rate_backdoors_score() -> None:
    from soda_backdoor.detection.errors import SENSITIVE_TAU
    from soda_backdoor.reporting.text import near_miss

    names = [f"c{k}" for k in range(4)]
    ev = [[0.0] * 4 for _ in range(4)]
    ev[1][3], ev[0][2] = 2.5, 1.2
    err = {"evidence": ev, "config": {"tau": 2.99}, "pairs": []}
    line = near_miss(err, names)
    assert line.startswith("1 (c1) -> 3 (c3) has evidence 2.50: under the threshold 2.99, over 2") and "--tau-errors 2" in line
    # nothing to say: the strongest pair is under the sensitive point, flagged, or the threshold is already there
    ev[1][3] = SENSITIVE_TAU - 0.1
    assert near_miss(err, names) == ""
    ev[1][3] = 2.5
    assert near_miss({**err, "pairs": [{"source": 1, "target": 3}]}, names) == ""
    assert near_miss({**err, "config": {"tau": SENSITIVE_TAU}}, names) == ""


def test_a_pair_needs_min_errors_to_be_flagged() -> None:
    """Two errors on a pair the references never make reach tau by chance; from three they flag.
    Below the minimum the evidence is capped at tau (it still ranks the model) and the report says why."""
    from soda_backdoor.reporting.text import near_miss

    ref = _reference([_counts({(1, 2): 10 + i % 5}) for i in range(20)]).entry("cnn")
    two, three = _counts({(0, 3): 2}), _counts({(0, 3): 3})
    loose = ErrorConfig(variation_tau=0.0, min_errors=1, exposure=None)
    assert error_evidence(two, ref, prior=0.5, null="nbpair")[0, 3] > loose.tau  # the chance event the minimum is for
    assert detect_errors(two, ref, loose).pairs == ((0, 3),)
    det = detect_errors(two, ref, ErrorConfig(variation_tau=0.0, exposure=None))
    assert ErrorConfig().min_errors == 3
    assert det.pairs == () and not det.backdoor
    assert det.evidence[0][3] == pytest.approx(loose.tau) and det.score == pytest.approx(loose.tau)
    assert detect_errors(three, ref, ErrorConfig(variation_tau=0.0, exposure=None)).pairs == ((0, 3),)
    line = near_miss(det.to_dict(), [f"c{k}" for k in range(K)])
    assert "on 2 confident errors only; a pair needs 3" in line and "--min-errors 1" in line
    with pytest.raises(UserInputError, match="min_errors"):
        ErrorConfig(min_errors=0)
