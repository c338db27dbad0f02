"""Audit rows, and the CSV and HTML tables written from them."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

CSV_COLUMNS = ("file", "sha256", "verdict", "pairs", "targets", "evidence", "score", "threshold", "max_anomaly",
               "probability",
               "arch", "detect_seconds", "seconds", "error", "report")
VERDICT_ORDER = {"backdoor": 0, "error": 1, "clean": 2}


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]


def audit_row(file: str, sha256: str, result: dict[str, Any] | None, error: str, seconds: float,
              report: str) -> dict[str, Any]:
    """One line of ``audit.jsonl``: the verdict and numbers of a model, or its error.

    Args:
        file: the model file.
        sha256: its hash (the row's ``key``).
        result: what :func:`~soda_backdoor.audit.worker.audit_model` returned (``None`` on error).
        error: the error message (``""`` on success).
        seconds: wall time of the task.
        report: the per-model report, relative to the audit folder.
    """
    row: dict[str, Any] = {"key": sha256, "file": file, "sha256": sha256, "verdict": "error", "pairs": [],
                           "targets": [], "target_scores": [], "anomaly_index": [], "max_anomaly": None,
                           "evidence": "", "score": None, "threshold": None, "probability": None, "arch": "", "layer": "",
                           "seconds": round(seconds, 3), "detect_seconds": None, "data_seconds": None,
                           "repair": None, "error": error, "report": report,
                           "audited_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if result is None:
        return row
    det = result["detect"]
    tt = det["target_test"]
    ai = _finite(tt["anomaly_index"])
    err = det.get("errors")  # the confident-error verdict, when it gave the verdict
    pairs = [[p["source"], p["target"]] for p in det["pairs"]]
    row.update(verdict="backdoor" if det["backdoor"] else "clean", pairs=pairs,
               targets=[t for _, t in pairs] if err else list(tt["flagged"]),
               evidence=det.get("evidence", "weights"),
               score=err["score"] if err else (max(ai) if ai else None),
               threshold=err["config"]["tau"] if err else tt["threshold"],
               target_scores=list(tt["scores"]), anomaly_index=list(tt["anomaly_index"]),
               max_anomaly=max(ai) if ai else None, arch=det.get("arch", ""),
               layer=det["layer"], detect_seconds=round(det["seconds"], 3),
               probability=(det.get("calibration") or {}).get("probability"),
               data_seconds=round(result["data_seconds"], 3))
    rep = result.get("repair")
    if rep is not None:
        row["repair"] = ({"error": rep["error"]} if "error" in rep else
                         {k: rep["repair"][k] for k in ("model", "acc_before", "acc_after", "asr_before", "asr_after",
                                                        "rasr_before", "rasr_after")})
    return row


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged models first, then errors, then clean models; most anomalous first within each."""
    return sorted(rows, key=lambda r: (VERDICT_ORDER.get(r["verdict"], 3),
                                       -(r.get("score", r.get("max_anomaly")) or 0.0), r["file"]))


def _pairs(row: dict[str, Any]) -> str:
    return ";".join(f"{s}->{t}" for s, t in row.get("pairs") or [])


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (columns :data:`CSV_COLUMNS`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in sort_rows(rows):
        values = {**r, "pairs": _pairs(r), "targets": ";".join(map(str, r.get("targets") or []))}
        w.writerow(["" if values.get(c) is None else values.get(c) for c in CSV_COLUMNS])
    return buf.getvalue()


_SORT_JS = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => { const c = r.cells[col], v = c.dataset.v ?? c.textContent; const n = parseFloat(v);
                     return isNaN(n) ? v : n; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    return (typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1)) * dir; });
  rows.forEach(r => body.appendChild(r));
}));
"""


def rows_html(rows: list[dict[str, Any]], title: str) -> str:
    """A sortable HTML table (click a header), flagged models first, linking each model's report."""
    e = html.escape
    order = sort_rows(rows)
    n = {v: sum(r["verdict"] == v for r in rows) for v in VERDICT_ORDER}
    head = ["verdict", "file", "pairs (source->target)", "score", "threshold", "evidence", "probability", "arch",
            "seconds", "error", "sha256"]
    lines = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font:14px sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{cursor:pointer;background:#eee}"
             "tr.backdoor td{background:#fdd}tr.error td{background:#ffe9c6}code{font-size:12px}</style>",
             f"<h1>{e(title)}</h1>",
             f"<p>{len(rows)} models: {n['backdoor']} flagged, {n['error']} errors, {n['clean']} clean. "
             "Click a header to sort.</p>",
             "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in order:
        mx = r.get("score", r.get("max_anomaly"))
        cells = [(str(VERDICT_ORDER.get(r["verdict"], 3)), f"<a href='{e(r['report'])}'>{e(r['verdict'])}</a>"),
                 (None, e(r["file"])), (None, e(_pairs(r).replace(";", ", "))),
                 (None, "" if mx is None else f"{mx:.2f}"),
                 (None, "" if r.get("threshold") is None else f"{r['threshold']:g}"),
                 (None, e(r.get("evidence") or "")),
                 (None, "" if r.get("probability") is None else f"{r['probability']:.3f}"),
                 (None, e(r.get("arch") or "")), (None, f"{r.get('seconds', 0):.1f}"), (None, e(r.get("error") or "")),
                 (r["sha256"], f"<code>{e(r['sha256'][:16])}</code>")]
        tds = "".join(f"<td data-v='{e(v)}'>{c}</td>" if v is not None else f"<td>{c}</td>" for v, c in cells)
        lines.append(f"<tr class='{e(r['verdict'])}'>{tds}</tr>")
    lines += ["</tbody></table>", f"<script>{_SORT_JS}</script>"]
    return "\n".join(lines) + "\n"


def model_report(row: dict[str, Any], result: dict[str, Any] | None) -> str:
    """The per-model JSON report: the row and the full detection (and repair) result."""
    return json.dumps({"row": row, "detect": (result or {}).get("detect"), "repair": (result or {}).get("repair")},
                      indent=1, default=str) + "\n"


def write_tables(out_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``audit.csv`` and ``audit.html`` (atomically) from the rows."""
    from ..utils import write_atomic

    csv_path, html_path = out_dir / "audit.csv", out_dir / "audit.html"
    text = rows_csv(rows)
    write_atomic(csv_path, lambda p: p.write_text(text))
    page = rows_html(rows, f"soda audit: {out_dir.resolve().name}")
    write_atomic(html_path, lambda p: p.write_text(page))
    return csv_path, html_path
