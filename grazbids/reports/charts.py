"""Charts of training and evaluation tables (matplotlib, Agg), returned as PNG bytes."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # reports are rendered in headless workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import pandas as pd  # noqa: E402

from .brain_figures import png_bytes  # noqa: E402

# (title, history column stem, y label); train dashed, validation solid
_CURVES = (
    ("Loss", "loss", "loss"),
    ("Balanced accuracy", "balanced_accuracy", "balanced accuracy"),
    ("Relevance inside the brain mask", "relevance_inside", "fraction of z+ relevance"),
)
TISSUE_COLUMNS = (("relevance_gm", "GM", "#4c72b0"), ("relevance_wm", "WM", "#dd8452"),
                  ("relevance_csf", "CSF", "#55a868"), ("relevance_outside_brain", "outside brain", "#999999"))


def learning_curves(histories: dict[str, pd.DataFrame], selected_epochs: dict[str, int] | None = None) -> bytes:
    """Train (dashed) and validation (solid) curves per fold; a dot marks the epoch the
    fold selected. Histories without validation columns (the final model) draw train only."""
    selected_epochs = selected_epochs or {}
    fig, axes = plt.subplots(1, len(_CURVES), figsize=(13, 4.0))
    colours = plt.get_cmap("tab10")
    for index, (name, history) in enumerate(histories.items()):
        colour = "black" if "final" in name else colours(index % 10)
        for ax, (title, stem, ylabel) in zip(axes, _CURVES):
            for split, style in (("train", "--"), ("val", "-")):
                column = f"{split}_{stem}"
                if column in history and history[column].notna().any():
                    ax.plot(history["epoch"], history[column], style, color=colour, linewidth=1.3,
                            label=f"{name} {'validation' if split == 'val' else 'train'}")
            epoch = selected_epochs.get(name)
            val = f"val_{stem}"
            if epoch is not None and val in history:
                row = history[history["epoch"] == epoch]
                if len(row):
                    ax.plot(epoch, row[val].iloc[0], "o", color=colour, markersize=6)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.set_ylim(-0.02, 1.02)
    # legend: one entry per fold colour, and the two line styles once
    handles = [Line2D([], [], color="black" if "final" in name else colours(i % 10), label=name)
               for i, name in enumerate(histories)]
    handles += [Line2D([], [], color="grey", linestyle="--", label="train"),
                Line2D([], [], color="grey", linestyle="-", label="validation")]
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return png_bytes(fig)


def confusion_matrix(true: list[str], predicted: list[str], classes: list[str]) -> bytes:
    """Counts of out-of-fold predictions; rows: true class, columns: predicted class."""
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), int)
    for t, p in zip(true, predicted):
        counts[index[t], index[p]] += 1
    size = 1.2 + 0.9 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    for (i, j), n in np.ndenumerate(counts):
        share = n / max(counts[i].sum(), 1)
        ax.text(j, i, f"{n}\n({share:.0%})", ha="center", va="center",
                color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return png_bytes(fig)


def tissue_relevance(metrics: pd.DataFrame) -> bytes | None:
    """Mean share of positive relevance per tissue class, one stacked bar per true class
    (and all participants). None when the table has no tissue columns."""
    present = [(c, name, colour) for c, name, colour in TISSUE_COLUMNS if c in metrics]
    if not present:
        return None
    groups = {"all": metrics}
    if "true_label" in metrics:
        groups.update({f"true {label}": rows for label, rows in metrics.groupby("true_label", sort=True)})
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(groups) + 1.4))
    for row, (name, rows) in enumerate(groups.items()):
        left = 0.0
        for column, label, colour in present:
            value = float(pd.to_numeric(rows[column], errors="coerce").mean())
            if not np.isfinite(value):
                continue
            ax.barh(row, value, left=left, color=colour, label=label if row == 0 else None)
            if value > 0.05:
                ax.text(left + value / 2, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
            left += value
    ax.set_yticks(range(len(groups)), list(groups))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean fraction of positive relevance")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(present), frameon=False)
    fig.tight_layout()
    return png_bytes(fig)


def metric_strips(metrics: pd.DataFrame, columns: list[str]) -> bytes:
    """One panel per metric: participants as points, grouped by true class, with the mean."""
    groups = (dict(tuple(metrics.groupby("true_label", sort=True))) if "true_label" in metrics
              else {"all": metrics})
    ncols = min(4, len(columns))
    nrows = int(np.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same report for the same data
    for ax, column in zip(axes.ravel(), columns):
        for position, (name, rows) in enumerate(groups.items()):
            values = pd.to_numeric(rows[column], errors="coerce").dropna().to_numpy(dtype=float)
            if not len(values):
                continue
            ax.plot(position + rng.uniform(-0.15, 0.15, len(values)), values, "o", alpha=0.6, markersize=4)
            ax.plot([position - 0.3, position + 0.3], [values.mean()] * 2, "k-", linewidth=2)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups])
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    fig.tight_layout()
    return png_bytes(fig)
