"""``soda run``: train -> evaluate -> detect -> reconstruct -> repair -> evaluate -> report.

The run folder holds everything. Each step records the hash of its settings and inputs in
``steps/<step>.json``; a step whose record matches and whose outputs exist is not redone
(``--force`` redoes all). Every file is written atomically, so an interrupted run never
leaves a half-written artifact that a resumed run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ..errors import UserInputError
from ..utils import resolve_device, write_json

logger = logging.getLogger(__name__)

DEFAULT_DIR = "runs/default"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Runner:
    """Runs named steps with caching by key in ``out/steps``."""

    def __init__(self, out: Path, force: bool, quiet: bool) -> None:
        self.out = out
        self.force = force
        self.quiet = quiet
        self.records: list[dict[str, Any]] = []

    def step(self, name: str, settings: dict[str, Any], outputs: list[str], fn: Callable[[], dict[str, Any]]) -> dict:
        key = _hash(settings)
        state_path = self.out / "steps" / f"{name}.json"
        if not self.force and state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("key") == key and all((self.out / o).is_file() for o in outputs):
                self._say(f"[{name}] up to date, reusing ({state.get('seconds', 0):.1f}s before)")
                record = {**state, "cached": True}
                self.records.append(record)
                return state["result"]
        self._say(f"[{name}] running ...")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        record = {"step": name, "key": key, "seconds": seconds, "outputs": outputs, "result": result,
                  "settings": settings}
        write_json(state_path, record)
        self.records.append({**record, "cached": False})
        self._say(f"[{name}] done in {seconds:.1f}s")
        return result

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def run_pipeline(args) -> int:
    """The whole job into one run folder; returns the exit status."""
    from .main import _detection_config, _recon_config, _repair_config, _train_config, format_detection
    from .steps import run_detect, run_evaluate, run_reconstruct, run_repair, run_train

    out = Path(args.out_dir or DEFAULT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    progress = not args.quiet
    attack = args.attack
    if attack is None and args.attack_file is None and args.model is None:
        attack = "stripet" if args.dataset == "fmnist" else "none"
    train_cfg, det_cfg = _train_config(args), _detection_config(args)
    rec_cfg, rep_cfg = _recon_config(args), _repair_config(args)
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "attack": attack, "attack_file": args.attack_file,
            "seed": args.seed}
    config = {**data, "arch": args.arch, "model": args.model, "train": asdict(train_cfg),
              "detect": asdict(det_cfg), "layer": args.layer, "reconstruct": asdict(rec_cfg),
              "repair": asdict(rep_cfg), "device": str(device)}
    write_json(out / "config.json", config)
    runner = Runner(out, args.force, args.quiet)
    t_start = time.perf_counter()

    # 1. the model: trained here, or given
    if args.model is None:
        model_path = "model.safetensors"
        history_path = out / "train_history.json"

        def train() -> dict:
            def log_epoch(rec: dict) -> None:
                print(f"  epoch {rec['epoch']}: loss {rec['loss']:.4f}, train acc {rec['train_acc']:.4f}",
                      file=sys.stderr, flush=True)
            res = run_train(args.dataset, args.data_dir, attack, args.attack_file, args.arch, str(out / model_path),
                            train_cfg, device, args.init, progress, log_epoch)
            write_json(history_path, res["history"])
            return res

        runner.step("train", {**data, "arch": args.arch, "train": asdict(train_cfg), "init": args.init},
                    [model_path], train)
        model_file = out / model_path
    else:
        model_file = Path(args.model)
        if not model_file.is_file():
            raise UserInputError(f"model file {model_file} does not exist")
        from .steps import load_context, open_model

        # refuse an unsafe or mismatched model before any step runs
        open_model(str(model_file), load_context(args.dataset, args.data_dir, None, None), device, args.arch)
    model_key = _file_hash(model_file)

    # 2. evaluate the model as given
    before = runner.step("evaluate", {**data, "model": model_key}, [],
                         lambda: run_evaluate(str(model_file), args.dataset, args.data_dir, attack, args.attack_file,
                                              device, args.arch))

    # 3. detect
    det = runner.step("detect", {**data, "model": model_key, "detect": asdict(det_cfg), "layer": args.layer},
                      ["detect.json", "effects.npz"],
                      lambda: _write(out / "detect.json", run_detect(
                          str(model_file), args.dataset, args.data_dir, attack, args.attack_file, det_cfg,
                          args.layer, device, args.seed, args.arch, str(out / "effects.npz"), progress)))
    print(format_detection(det), file=sys.stderr)

    rep = after = None
    if det["backdoor"]:
        src, tgt = det["pairs"][0]["source"], det["pairs"][0]["target"]
        # 4. reconstruct
        runner.step("reconstruct", {**data, "model": model_key, "pair": [src, tgt],
                                          "reconstruct": asdict(rec_cfg)},
                          ["samples.npz", "figures/reconstructions.png"],
                          lambda: _write(out / "reconstruct.json", run_reconstruct(
                              str(model_file), args.dataset, args.data_dir, attack, args.attack_file, src, tgt,
                              rec_cfg, str(out / "samples.npz"), device, args.seed, args.arch,
                              str(out / "figures" / "reconstructions.png"), progress)))
        samples_key = _file_hash(out / "samples.npz")
        # 5. repair
        rep = runner.step("repair", {**data, "model": model_key, "pair": [src, tgt], "samples": samples_key,
                                     "repair": asdict(rep_cfg), "layer": args.layer},
                          ["repaired.safetensors", "repair.json"],
                          lambda: _write(out / "repair.json", run_repair(
                              str(model_file), args.dataset, args.data_dir, attack, args.attack_file, src, tgt,
                              str(out / "samples.npz"), rep_cfg, str(out / "repaired.safetensors"), device,
                              args.layer, args.num_samples, args.arch, progress)))
        # 6. evaluate the repaired file as any user would
        after = runner.step("evaluate_repaired", {**data, "model": _file_hash(out / "repaired.safetensors")}, [],
                            lambda: run_evaluate(str(out / "repaired.safetensors"), args.dataset, args.data_dir,
                                                 attack, args.attack_file, device))

    total = time.perf_counter() - t_start
    summary = {"run_dir": str(out), "verdict": _verdict(det), "backdoor": det["backdoor"], "pairs": det["pairs"],
               "before": before, "after": after, "total_seconds": total,
               "steps": [{"step": r["step"], "seconds": r["seconds"], "cached": r["cached"], "result": r["result"]}
                         for r in runner.records]}
    write_json(out / "summary.json", summary)

    from ..reporting.report import render_report

    report = render_report(out)
    print(f"\n{summary['verdict']}")
    if rep is not None:
        print(f"repair: acc {rep['acc_before']:.4f} -> {rep['acc_after']:.4f}, asr {rep['asr_before']:.4f} -> "
              f"{rep['asr_after']:.4f}, r-asr {rep['rasr_before']:.4f} -> {rep['rasr_after']:.4f}")
    for r in runner.records:
        print(f"  {r['step']:<18}{r['seconds']:>8.1f}s{'  (cached)' if r['cached'] else ''}")
    print(f"report: {report}")
    return 0


def _write(path: Path, result: dict) -> dict:
    write_json(path, result)
    return result


def _verdict(det: dict) -> str:
    names = det.get("class_names") or []
    label = lambda i: f"{i} ({names[i]})" if i < len(names) else str(i)  # noqa: E731
    if not det["backdoor"]:
        return "No semantic backdoor detected."
    pairs = ", ".join(f"source {label(p['source'])} -> target {label(p['target'])}" for p in det["pairs"])
    return f"Semantic backdoor detected: {pairs}."
