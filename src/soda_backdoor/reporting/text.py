"""Plain-text renderings of step results (terminal output of the CLI and the pipeline)."""

from __future__ import annotations

from typing import Any, Sequence


def class_label(names: Sequence[str], i: int) -> str:
    """``"2 (Pullover)"``, or ``"2"`` without class names."""
    return f"{i} ({names[i]})" if names and 0 <= i < len(names) else str(i)


def verdict(det: dict[str, Any]) -> str:
    """One sentence: the detected class pairs, or that there are none."""
    names = det.get("class_names") or []
    if not det["backdoor"]:
        return "No semantic backdoor detected."
    pairs = ", ".join(f"source {class_label(names, p['source'])} -> target {class_label(names, p['target'])}"
                      for p in det["pairs"])
    return f"Semantic backdoor detected: {pairs}."


def format_detection(res: dict[str, Any]) -> str:
    """A readable table of a detection result (``DetectReport.to_dict()``)."""
    names = res.get("class_names") or []
    tt = res["target_test"]
    folded = f", folded {res['folded']}" if res.get("folded") else ""
    cal = res.get("calibration")
    probs = cal["class_probabilities"] if cal and cal.get("class_probabilities") else []
    weight_probs = [] if res.get("errors") else probs
    context = " (weight profile, for context: the verdict rests on the confident errors below)" if res.get("errors") else ""
    lines = [f"layer {res['layer']} ({res['attribution_method']}{folded}), target threshold {tt['threshold']:g}{context}",
             f"{'class':<18}{'target score':>13}{'anomaly':>10}" + (f"{'P(target)':>11}" if weight_probs else "")]
    for k, (s, a) in enumerate(zip(tt["scores"], tt["anomaly_index"])):
        mark = "  <- target" if k in tt["flagged"] and not res.get("errors") else ""
        p = f"{weight_probs[k]:>11.3f}" if weight_probs else ""
        lines.append(f"{class_label(names, k):<18}{s:>13.4f}{a:>10.2f}{p}{mark}")
    for src in res["sources"]:
        lines.append(f"source scores for target {class_label(names, src['target'])} (rule {src['rule']}):")
        order = sorted(range(len(src["scores"])), key=lambda c: -src["scores"][c])
        for c in order[:4]:
            if c == src["target"]:
                continue
            lines.append(f"  {class_label(names, c):<16} score {src['scores'][c]:8.3f}  forward {src['forward'][c]:7.3f}  "
                         f"reverse {src['reverse'][c]:7.3f}  mean target logit {src['mean_logit'][c]:7.3f}")
    err = res.get("errors")
    if err:
        lines += format_errors(err, names, probs)
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    if res["backdoor"]:
        pairs = ", ".join(f"{class_label(names, p['source'])} -> {class_label(names, p['target'])}" for p in res["pairs"])
        lines.append(f"VERDICT: semantic backdoor detected: {pairs}")
    elif err:
        max_e = max(max(row) for row in err["evidence"])
        why = f"no pair's confident-error evidence exceeds {err['config']['tau']:g}; max {max_e:.2f}"
        vx = err.get("variation_excess")
        if vx:
            max_v = max(v for s, row in enumerate(vx) for t, v in enumerate(row) if s != t)
            why += f"; no variation excess reaches {err['config']['variation_tau']:g}; max {max_v:.3f}"
        lines.append(f"VERDICT: no semantic backdoor detected ({why})")
    else:
        lines.append(f"VERDICT: no semantic backdoor detected (no class's anomaly index exceeds {tt['threshold']:g}; "
                     f"max {max(a for a in tt['anomaly_index'] if a == a):.2f})")
    closer = near_miss(err, names) if err else ""
    if closer:
        lines.append(f"look closer: {closer}")
    if cal:
        lines.append(cal["message"] if cal["probability"] is None else
                     f"P(backdoor) = {cal['probability']:.3f} (calibrated on {cal['fitted_on']})")
    return "\n".join(lines)


def near_miss(err: dict[str, Any], names: Sequence[str]) -> str:
    """A sentence on the strongest unflagged pair when its evidence is under the threshold but
    at least ``SENSITIVE_TAU``, where backdoors poisoned at a low rate score; else ``""``."""
    from ..detection.errors import SENSITIVE_TAU

    tau, ev = err["config"]["tau"], err["evidence"]
    flagged = {p["target"] for p in err["pairs"]}
    cells = [(ev[s][t], s, t) for s in range(len(ev)) for t in range(len(ev)) if s != t and t not in flagged]
    if not cells or tau <= SENSITIVE_TAU:
        return ""
    e, s, t = max(cells)
    if not SENSITIVE_TAU <= e <= tau:
        return ""
    counts, m = err.get("counts"), err["config"].get("min_errors", 1)
    n = counts["counts"][s][t] if counts else m
    if n < m:
        return (f"{class_label(names, s)} -> {class_label(names, t)} reaches evidence {e:.2f} on {n} confident "
                f"error{'s' if n != 1 else ''} only; a pair needs {m} to be flagged (so few on a pair the reference "
                "almost never confuses happen to clean models by chance; `--min-errors 1` flags it)")
    return (f"{class_label(names, s)} -> {class_label(names, t)} has evidence {e:.2f}: under the threshold "
            f"{tau:g}, over {SENSITIVE_TAU:g}, where backdoors poisoned at a low rate score; `--tau-errors "
            f"{SENSITIVE_TAU:g}` flags it, at more false alarms (4 of 40 clean reference models, against 1 of 40 "
            "at 2.99; docs/detection.md, \"Realistic poisoning on dev\")")


def _min_errors(err: dict[str, Any]) -> str:
    """``"; a pair needs 3 errors to be flagged"`` when the detection had a minimum count."""
    m = err["config"].get("min_errors", 1)
    return f"; a pair needs {m} errors to be flagged" if m > 1 else ""


def null_name(err: dict[str, Any]) -> str:
    """The null the evidence was computed under: ``nbpair`` falls back to Poisson for a reference
    without per-model counts (``ErrorDetection.to_dict()``)."""
    nb = err["config"].get("null") == "nbpair" and "no per-model counts" not in err.get("note", "")
    return "negative binomial (per pair)" if nb else "Poisson"


def format_errors(err: dict[str, Any], names: Sequence[str], probs: Sequence[float] = ()) -> list[str]:
    """The confident-error evidence per target class (``ErrorDetection.to_dict()``)."""
    c = err["counts"]
    flagged = {p["target"] for p in err["pairs"]}
    recal = (" (batch-norm statistics, where the model has them, re-estimated on the defender's data)"
             if err["config"].get("recalibrate_bn") else "")
    lines = [f"confident errors (softmax >= {c['threshold']:g}) on {sum(c['totals'])} test samples{recal}, against "
             f"the reference {err['reference']}, {null_name(err)} null; the verdict rests on them "
             f"(threshold {err['config']['tau']:g}{_min_errors(err)}):",
             f"{'target':<18}{'from source':<18}{'errors':>7}{'evidence':>10}" + (f"{'P(target)':>11}" if probs else "")]
    ev = err["evidence"]
    for t in range(len(ev)):
        s = max((k for k in range(len(ev)) if k != t), key=lambda k: (ev[k][t], c["counts"][k][t]))
        p = f"{probs[t]:>11.3f}" if probs else ""
        mark = ("" if t not in flagged else "  <- flagged" if ev[s][t] > err["config"]["tau"]
                else "  <- flagged by the variation evidence")
        lines.append(f"{class_label(names, t):<18}{class_label(names, s):<18}{c['counts'][s][t]:>7}"
                     f"{ev[s][t]:>10.2f}{p}{mark}")
    vx = err.get("variation_excess")
    if vx:
        k = len(vx)
        lines.append(f"variation evidence (excess rate of natural variations over the clean reference's largest; "
                     f"threshold {err['config']['variation_tau']:g}):")
        lines.append(f"{'target':<18}{'from source':<18}{'excess':>10}")
        for t in range(k):
            s = max((j for j in range(k) if j != t), key=lambda j: vx[j][t])
            mark = "  <- flagged" if vx[s][t] >= err["config"]["variation_tau"] else ""
            lines.append(f"{class_label(names, t):<18}{class_label(names, s):<18}{vx[s][t]:>10.3f}{mark}")
    return lines


def format_repair(res: dict[str, Any]) -> str:
    """ACC, ASR and R-ASR before and after a repair (``RepairReport.to_dict()``)."""
    return (f"{'':<8}{'before':>8}{'after':>8}\n{'ACC':<8}{res['acc_before']:>8.4f}{res['acc_after']:>8.4f}\n"
            f"{'ASR':<8}{res['asr_before']:>8.4f}{res['asr_after']:>8.4f}\n"
            f"{'R-ASR':<8}{res['rasr_before']:>8.4f}{res['rasr_after']:>8.4f}")
