"""Figures of the report (matplotlib, Agg backend, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..data.datasets import denormalize  # noqa: E402
from ..reconstruction import Reconstruction  # noqa: E402
from ..utils import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def _name(names: Sequence[str], i: int) -> str:
    return f"{i} {names[i]}" if names and i < len(names) else str(i)


def _to_image(x: torch.Tensor) -> np.ndarray:
    img = x.detach().cpu().numpy()
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def plot_reconstructions(rec: Reconstruction, mean, std, path: str | Path, class_names: Sequence[str] = (),
                         max_pairs: int = 16) -> Path:
    """Starting images beside their reconstructions, de-normalised for viewing."""
    n = min(max_pairs, rec.kept)
    cols = 8
    rows = max(1, (n + cols - 1) // cols) * 2
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.4))
    axes = np.atleast_2d(axes)
    starts = denormalize(rec.starts[:n].float(), tuple(mean), tuple(std))
    recs = denormalize(rec.samples[:n].float(), tuple(mean), tuple(std))
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = (i // cols) * 2, i % cols
        cmap = "gray" if starts.shape[1] == 1 else None
        axes[r, c].imshow(_to_image(starts[i]), cmap=cmap, vmin=0, vmax=1)
        axes[r, c].set_title("start", fontsize=7)
        axes[r + 1, c].imshow(_to_image(recs[i]), cmap=cmap, vmin=0, vmax=1)
        axes[r + 1, c].set_title(f"p={float(rec.target_prob[i]):.2f}, {int(rec.steps[i])} st", fontsize=7)
    fig.suptitle(f"Reconstructed infected samples: {_name(class_names, rec.source)} -> "
                 f"{_name(class_names, rec.target)} ({rec.kept} kept of {rec.tried} tried)", fontsize=9)
    return _save(fig, path)


def plot_scores(scores: Sequence[float], anomaly: Sequence[float], threshold: float, flagged: Sequence[int],
                path: str | Path, title: str, class_names: Sequence[str] = (), exclude: Sequence[int] = ()) -> Path:
    """Per-class scores as bars, coloured by the outlier test, with the threshold line."""
    k = len(scores)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    colors = ["#d62728" if i in flagged else ("#bbbbbb" if i in exclude else "#1f77b4") for i in range(k)]
    labels = [_name(class_names, i) for i in range(k)]
    ax1.bar(range(k), scores, color=colors)
    ax1.set_title("score", fontsize=9)
    idx = [a if np.isfinite(a) else 0.0 for a in anomaly]
    ax2.bar(range(k), idx, color=colors)
    ax2.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax2.set_title("anomaly index (MAD)", fontsize=9)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(range(k))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_attribution_heatmap(matrices: np.ndarray, classes: Sequence[int], path: str | Path, target: int | None,
                             source: int | None, class_names: Sequence[str] = (), top: int = 40) -> Path:
    """Attribution of the top neurons (by effect on the target, or overall) to every logit."""
    c = classes.index(source) if source is not None and source in classes else 0
    a = matrices[c]
    key = a[:, target] if target is not None else a.max(1)
    order = np.argsort(-key)[:top]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    im = ax.imshow(a[order].T, aspect="auto", cmap="viridis")
    ax.set_yticks(range(a.shape[1]))
    ax.set_yticklabels([_name(class_names, i) for i in range(a.shape[1])], fontsize=7)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(i) for i in order], rotation=90, fontsize=6)
    ax.set_xlabel("neuron (top by attribution to the target)" if target is not None else "neuron")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(f"Causal attribution A_c[i, k] seen from class {_name(class_names, classes[c])}", fontsize=9)
    return _save(fig, path)


def plot_training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Loss, training accuracy and poisoned-batch attack success per epoch."""
    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    ax1.plot(ep, [h["loss"] for h in history], marker="o")
    ax1.set_title("training loss", fontsize=9)
    ax2.plot(ep, [h.get("train_acc", 0) for h in history], marker="o", label="train acc")
    if any(h.get("poison_train_asr") for h in history):
        ax2.plot(ep, [h.get("poison_train_asr", 0) for h in history], marker="s", label="poisoned samples -> target")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
    return _save(fig, path)


def plot_before_after(metrics: dict[str, tuple[float, float]], path: str | Path) -> Path:
    """Grouped bars of metrics before and after repair."""
    names = list(metrics)
    before = [metrics[n][0] for n in names]
    after = [metrics[n][1] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3))
    b1 = ax.bar(x - 0.2, before, 0.4, label="before", color="#d62728")
    b2 = ax.bar(x + 0.2, after, 0.4, label="after", color="#2ca02c")
    for bars in (b1, b2):
        for bar in bars:
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"{bar.get_height():.2f}",
                    ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1.12)
    ax.legend(fontsize=8)
    ax.set_title("Before / after repair", fontsize=9)
    return _save(fig, path)


def plot_timings(timings: dict[str, float], path: str | Path) -> Path:
    """Seconds per pipeline step."""
    fig, ax = plt.subplots(figsize=(6, 2.6))
    names = list(timings)
    ax.barh(names, [timings[n] for n in names], color="#7f7f7f")
    for i, n in enumerate(names):
        ax.text(timings[n], i, f" {timings[n]:.1f}s", va="center", fontsize=7)
    ax.set_xlabel("seconds")
    ax.invert_yaxis()
    return _save(fig, path)
