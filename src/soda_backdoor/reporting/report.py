"""The human report of a run folder: ``report.html`` with relative PNG figures.

Reads only what ``soda run`` wrote (summary.json and each step's JSON), so ``soda report DIR``
re-renders it at any time.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserInputError
from ..utils import write_atomic
from . import plots
from .text import class_label, near_miss, null_name



GOOD_ASR = 0.10


def repair_verdict(rep: dict) -> str:
    """One plain sentence on what the repair achieved on the real semantic samples, not just R-ASR."""
    loss = (rep["acc_before"] - rep["acc_after"]) * 100
    cost = f"at {loss:.1f} points of clean accuracy" if loss > 0 else "with no loss of clean accuracy"
    if not rep.get("n_semantic"):
        return (f"R-ASR went from {rep['rasr_before']:.2f} to {rep['rasr_after']:.2f} {cost}; the attack's real "
                "semantic samples are unknown here, so whether the backdoor is gone on real inputs is not measured.")
    if rep["asr_after"] <= GOOD_ASR:
        return (f"Repaired: the real semantic test samples sent to the target fell from {rep['asr_before']:.2f} "
                f"to {rep['asr_after']:.2f} (R-ASR {rep['rasr_before']:.2f} -> {rep['rasr_after']:.2f}), {cost}.")
    return (f"Partial repair: {rep['asr_after']:.2f} of the real semantic test samples still go to the target "
            f"(before {rep['asr_before']:.2f}), although R-ASR on the reconstructed samples is "
            f"{rep['rasr_after']:.2f}: the reconstructed samples did not cover the real feature. {cost[0].upper()}{cost[1:]}.")

def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def render_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (and its figures) from the run's JSON files."""
    out = Path(run_dir)
    summary = _load(out / "summary.json")
    if summary is None:
        raise UserInputError(f"{out} holds no summary.json: it is not a finished `soda run` folder")
    det = _load(out / "detect.json")
    rec = _load(out / "reconstruct.json")
    rep = _load(out / "repair.json")
    history = _load(out / "train_history.json")
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    names = (det or {}).get("class_names") or []
    sections: list[str] = []
    images: list[tuple[str, str]] = []

    verdict_cls = "bad" if summary["backdoor"] else "good"
    verdict = f"<div class='verdict {verdict_cls}'>{html.escape(summary['verdict'])}</div>"
    err = (det or {}).get("errors")
    if det and err:
        vx = err.get("variation_excess")

        def variations_into(t: int) -> str:  # the variation evidence of target t, when it is on
            if not vx:
                return ""
            s = max((j for j in range(len(vx)) if j != t), key=lambda j: vx[j][t])
            return (f"; natural variations of {class_label(names, s)} reach it {vx[s][t]:+.3f} over the clean "
                    f"reference's largest rate (threshold {err['config']['variation_tau']:g})")

        if det["backdoor"]:
            how = ", ".join(f"{err['counts']['counts'][p['source']][p['target']]} test samples of "
                            f"{class_label(names, p['source'])} given {class_label(names, p['target'])} with "
                            f"softmax >= {err['counts']['threshold']:g}, evidence "
                            f"{err['evidence'][p['source']][p['target']]:.2f} (threshold {err['config']['tau']:g})"
                            f"{variations_into(p['target'])}" for p in det["pairs"])
            how += f" (reference {err['reference']})"
        else:
            max_e = max(max(row) for row in err["evidence"])
            how = (f"the largest confident-error evidence of any class pair is {max_e:.2f}, not above the "
                   f"threshold {err['config']['tau']:g} (reference {err['reference']})")
            if vx:
                max_v = max(v for a, row in enumerate(vx) for b, v in enumerate(row) if a != b)
                how += (f"; the largest excess rate of natural variations is {max_v:.3f}, below "
                        f"{err['config']['variation_tau']:g}")
        verdict += f"<p>How sure: {html.escape(how)}.</p>"
        closer = near_miss(err, names)
        if closer:
            verdict += f"<p>Look closer: {html.escape(closer)}.</p>"
    if det and det.get("note"):
        verdict += f"<p>Note: {html.escape(det['note'])}</p>"
    if det and not err:
        tt = det["target_test"]
        finite = [a for a in tt["anomaly_index"] if a == a and a != float("inf")]
        if det["backdoor"]:
            how = ", ".join(f"target {class_label(names, t)} anomaly index {tt['anomaly_index'][t]:.2f} "
                            f"(threshold {tt['threshold']:g})" for t in tt["flagged"])
        else:
            how = (f"the largest anomaly index of any class is {max(finite) if finite else 0:.2f}, below the "
                   f"threshold {tt['threshold']:g}")
        verdict += f"<p>How sure: {html.escape(how)}.</p>"
    if det:
        cal = det.get("calibration")
        if cal:  # `soda run --calibration`
            said = (cal["message"] if cal["probability"] is None else
                    f"P(backdoor) = {cal['probability']:.3f}, calibrated on {cal['fitted_on']} "
                    "(a probability, not a verdict: docs/detection.md)")
            verdict += f"<p>{html.escape(said)}</p>"
    sections.append(verdict)

    if det:
        tt = det["target_test"]
        plots.plot_scores(tt["scores"], tt["anomaly_index"], tt["threshold"], tt["flagged"], figs / "target_scores.png",
                          "Target scores (1 - mean Pearson correlation)", names)
        images.append(("Target scores against the threshold", "figures/target_scores.png"))
        for src in det["sources"]:
            t = src["target"]
            plots.plot_scores(src["scores"], src["outlier"]["anomaly_index"], src["outlier"]["threshold"], [src["source"]],
                              figs / f"source_scores_t{t}.png", f"Source scores for target {class_label(names, t)} "
                              f"(rule: {src['rule']})", names, exclude=[t])
            images.append((f"Source scores for target {class_label(names, t)}", f"figures/source_scores_t{t}.png"))
        eff = out / "effects.npz"
        if eff.is_file():
            with np.load(eff, allow_pickle=False) as z:
                mats, classes = z["matrices"], [int(c) for c in z["classes"]]
            pair = det["pairs"][0] if det["pairs"] else None
            plots.plot_attribution_heatmap(mats, classes, figs / "attribution.png", pair["target"] if pair else None,
                                           pair["source"] if pair else None, names)
            images.append(("Causal attribution of the top neurons", "figures/attribution.png"))
    if (figs / "reconstructions.png").is_file() and rec:
        images.append((f"Reconstructed samples ({rec['kept']} kept of {rec['tried']} tried)", "figures/reconstructions.png"))
    if rep:
        metrics = {"ACC": (rep["acc_before"], rep["acc_after"]), "ASR": (rep["asr_before"], rep["asr_after"]),
                   "R-ASR": (rep["rasr_before"], rep["rasr_after"])}
        plots.plot_before_after(metrics, figs / "before_after.png")
        images.append(("Accuracy and attack success before and after repair", "figures/before_after.png"))
    if history:
        plots.plot_training_curves(history, figs / "training.png")
        images.append(("Training curves", "figures/training.png"))
    timings = {s["step"]: s["seconds"] for s in summary["steps"]}
    if timings:
        plots.plot_timings(timings, figs / "timings.png")
        images.append(("Time per step", "figures/timings.png"))

    rows = []
    if summary.get("before"):
        b = summary["before"]
        rows.append(["model as given", b["acc"], b["asr"], b["n_clean"], b["n_semantic"]])
    if summary.get("after"):
        a = summary["after"]
        rows.append(["repaired model", a["acc"], a["asr"], a["n_clean"], a["n_semantic"]])
    if rows:
        sections.append("<h2>Accuracy and attack success</h2>" +
                        _table(rows, ["model", "ACC", "ASR", "clean test samples", "semantic test samples"]))
    if rep:
        sections.append("<h2>Repair</h2>" + f"<p><strong>{html.escape(repair_verdict(rep))}</strong></p>" +
                        _table([["ASR (real semantic test samples)", rep["asr_before"], rep["asr_after"]],
                                ["R-ASR (held-out reconstructed samples)", rep["rasr_before"], rep["rasr_after"]],
                                ["ACC (clean test split)", rep["acc_before"], rep["acc_after"]]],
                               ["", "before", "after"]) +
                        f"<p>Repair fine-tuned at layer <code>{html.escape(rep['layer'])}</code> keeping "
                        f"{rep['neurons_kept']} of {rep['num_neurons']} neurons (mask fraction "
                        f"{rep['config']['top']:g}), with {rep['n_repair_samples']} reconstructed samples, "
                        f"{rep.get('n_varied_samples', 0)} varied clean source samples that the model sent to "
                        f"the target, {rep.get('n_feature_samples', 0)} clean source samples moved to the "
                        f"target in feature space, and {rep['n_defender']} clean samples.</p>"
                        + _feature_guard_line(rep))
    if err:
        ev, counts = err["evidence"], err["counts"]["counts"]
        probs = (det.get("calibration") or {}).get("class_probabilities") or []
        rows = []
        for t in range(len(ev)):
            src = max((k for k in range(len(ev)) if k != t), key=lambda k: ev[k][t])
            rows.append([class_label(names, t), class_label(names, src), counts[src][t], ev[src][t],
                         *([probs[t]] if probs else []),
                         "flagged" if any(p["target"] == t for p in det["pairs"]) else ""])
        sections.append("<h2>Confident errors (the verdict)</h2>" + _table(
            rows, ["target", "from source", "errors", "evidence (-log10 p)", *(["P(target)"] if probs else []), ""]) +
            f"<p>Test samples of each class that the model gives another class with softmax &gt;= "
            f"{err['counts']['threshold']:g}, against the clean reference models {html.escape(err['reference'])} "
            + ("(negative binomial null with each pair's spread over the reference models"
               if null_name(err) != "Poisson" else "(Poisson null") + f", prior {err['config']['prior']:g}"
            + (f", scaled by the model's confidence factor ({err['config']['exposure']:g} pseudo-errors)"
               if err["config"].get("exposure") is not None else "")
            + "); docs/detection.md.</p>")
    if det:
        tt = det["target_test"]
        sections.append(("<h2>Weight profile (for context)</h2>" if err else "<h2>Detection scores</h2>") + _table(
            [[class_label(names, k), s, a, "target" if k in tt["flagged"] else ""]
             for k, (s, a) in enumerate(zip(tt["scores"], tt["anomaly_index"]))],
            ["class", "target score", "anomaly index", "flagged"]) +
            f"<p>Layer <code>{html.escape(det['layer'])}</code>, attribution method {html.escape(det['attribution_method'])}"
            + (f" (folded: <code>{html.escape(det['folded'])}</code>)" if det.get("folded") else "") + ", "
            f"median {tt['median']:.4f}, MAD {tt['mad']:.4f}.</p>")
    figs_html = "".join(f"<figure><img src='{html.escape(p)}' alt='{html.escape(t)}'><figcaption>{html.escape(t)}"
                        f"</figcaption></figure>" for t, p in images)
    sections.append("<h2>Figures</h2>" + figs_html)
    sections.append("<h2>Timings</h2>" + _table(
        [[s["step"], s["seconds"], "reused" if s["cached"] else ""] for s in summary["steps"]] +
        [["total", summary["total_seconds"], ""]], ["step", "seconds", ""]))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SODA report: {html.escape(summary['verdict'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
.verdict {{ font-size: 1.6em; padding: .6em 1em; border-radius: 6px; }}
.bad {{ background: #fde2e1; border: 2px solid #d62728; }}
.good {{ background: #e2f5e1; border: 2px solid #2ca02c; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .3em .7em; text-align: right; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>SODA semantic-backdoor report</h1>
{''.join(sections)}
<p><small>Run folder: {html.escape(str(out))}. Machine-readable results: summary.json, detect.json,
reconstruct.json, repair.json.</small></p>
</body></html>
"""
    path = out / "report.html"
    write_atomic(path, lambda p: p.write_text(page))
    return path


def _feature_guard_line(rep: dict) -> str:
    """What the feature samples' accuracy guard decided (docs/repair.md), or nothing."""
    loss, guard = rep.get("feature_guard_loss"), (rep.get("config") or {}).get("feature_guard")
    if loss is None or guard is None:
        return ""
    if rep.get("feature_fallback"):
        return (f"<p>The repair with the feature-space samples cost {loss:.2f} points of accuracy on the guard half "
                f"of the test split, more than the guard's {guard:g}: this is the repair without them.</p>")
    return (f"<p>The feature-space samples cost {loss:.2f} points of accuracy on the guard half of the test "
            f"split, within the guard's {guard:g}: kept.</p>")
