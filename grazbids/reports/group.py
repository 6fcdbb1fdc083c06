"""Group report ``output_dir/group/report.html``: one section per trained mode.

Per mode (``group/mode-<mode>/``): cross-validation metrics, mean z+ relevance per class
on the template (same slices and colour scale for every class), learning curves per
fold, the out-of-fold confusion matrix, explanation metrics when the training wrote them,
the counterfactual simulator's group-mean log-Jacobian maps (--counterfactual), and the
participants with links to their reports. Only files that exist are shown.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pandas as pd

from ..explain.dependence import FLIP_RATE_ADVICE, FLIP_RATE_WARNING, NEAR_CHANCE_ADVICE
from ..group.layout import MEAN_MAP, GroupLayout, ModeLayout, safe_label
from . import brain_figures as bf
from . import charts
from .counterfactual import group_section as counterfactual_section
from .html import data_table, escape, figure, format_value, heading, key_value_table, paragraph, write_page

LOG = logging.getLogger("grazbids.reports")
MODE_TITLES = {"plain": "plain CNN", "masked": "masked-input CNN", "grazplus": "Graz+ (relevance-guided)"}
# Columns of per-participant tables that identify or group rows rather than measure.
ID_COLUMNS = ("participant_id", "session_id", "fold", "true_label", "predicted_label")


def read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: unreadable table ({err})") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from None


def mode_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """``group/mode-*`` folders with cross-validation results, in the order plain, masked, grazplus."""
    return [m.root for m in GroupLayout(Path(output_dir)).trained_modes()]


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """Measured columns: numbers or booleans (e.g. pointing game hits), ids left out."""
    columns = []
    for column in frame.columns:
        if column in ID_COLUMNS:
            continue
        values = frame[column]
        if values.dtype == bool or pd.api.types.is_numeric_dtype(values):
            if values.notna().any():
                columns.append(column)
    return columns


def _as_numbers(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame[columns].astype(float)


# ---------------------------------------------------------------------------- sections
def _cv_section(mode: ModeLayout) -> str:
    parts = [heading(3, "Cross-validation metrics")]
    summary_path = mode.cv_metrics_json
    if summary_path.exists():
        summary = read_json(summary_path)
        rows = [(k.replace("_", " "), summary[k]) for k in (
            "balanced_accuracy_mean", "balanced_accuracy_sd", "balanced_accuracy_min", "balanced_accuracy_max",
            "pooled_oof_balanced_accuracy", "relevance_inside_mask_mean") if k in summary]
        if "target_column" in summary:
            rows.insert(0, ("target column", summary["target_column"]))
        if "classes" in summary:
            rows.insert(1, ("classes", ", ".join(map(str, summary["classes"]))))
        parts.append(key_value_table(rows))
    parts.append(data_table(read_tsv(mode.cv_metrics_tsv)))
    return "\n".join(parts)


def _template_underlay(maps: list[Path]) -> tuple[object | None, object]:
    """(background, mask) for the mean maps: the template when its grid matches, else no
    background and the maps' own support as mask."""
    match = MEAN_MAP.match(maps[0].name)
    return bf.template_underlay(match.group("tpl"), match.group("res"), maps)


TOP_SHARE = 0.1  # mean class maps: draw the most relevant 10 % of the brain voxels


def _class_heatmaps_section(folder: Path, classes: list[str], desc: str = "zplus", label: str = "z+ relevance") -> str:
    maps = ModeLayout.mean_maps(folder, desc)
    if not maps:
        return ""
    safe = [safe_label(c) for c in classes]
    ordered = sorted(maps, key=lambda m: (safe.index(maps[m]) if maps[m] in safe else len(safe), maps[m]))
    background, mask = _template_underlay(ordered)
    vmax = bf.robust_max(ordered, mask)
    named = {f"class {maps[m]}": m for m in ordered}
    threshold = bf.top_share_threshold(ordered, mask, TOP_SHARE)
    png = bf.class_heatmaps_figure(named, background, mask_img=mask, vmax=vmax, threshold=threshold)
    cuts = ", ".join(f"{z:.0f}" for z in bf.axial_cuts(mask))
    caption = (f"Mean out-of-fold {label} of the participants of each true class"
               + (" over the template T1w (brain)" if background else "")
               + f"; the same axial slices (z = {cuts} mm, left of the brain on the left) and colour "
               f"scale (0 to {vmax:.2e}) in every row; only the top {TOP_SHARE:.0%} of the brain voxels of "
               f"all classes together (values above {threshold:.2e}) are drawn.")
    return heading(3, f"Mean {label} per class") + figure(png, caption)


TOP_REGIONS = 15


def _regions_section(folder: Path) -> str:
    path = folder / "regions_summary.tsv"
    if not path.exists():
        return ""
    ranked = read_tsv(path)
    atlas = read_json(folder / "regions.json").get("Atlas", "") if (folder / "regions.json").exists() else ""
    return (heading(3, "Relevance per atlas region") +
            paragraph(f"The {min(TOP_REGIONS, len(ranked))} regions with the largest mean share of positive "
                      f"relevance (of {len(ranked)}; all in {path.name}, per participant in regions.tsv); "
                      "relevance_over_volume > 1: more relevance than the region's share of the grid. "
                      f"Atlas: {atlas}.") +
            data_table(ranked.head(TOP_REGIONS)))


def _featurevis_section(mode: ModeLayout) -> str:
    """The feature visualisations of the mode's final model (--feature-visualisation)."""
    pngs = sorted(mode.featurevis_dir.glob("featurevis_*.png"))
    if not pngs:
        return ""
    parts = [heading(3, "Feature visualisation"),
             paragraph("For each class, an input image optimised by gradient ascent to maximise the final "
                       "model's logit of that class (activation maximisation, Eitel et al. 2022), inside the "
                       "template brain mask. Patterns that are not anatomy hint at what the network detects; "
                       "they are not a map of the disease effect. NIfTI and settings beside each figure in "
                       f"{mode.root.name}/{mode.featurevis_dir.name}/.", "note")]
    for png in pngs:
        sidecar = png.with_suffix(".json")
        details = read_json(sidecar) if sidecar.exists() else {}
        regularisers = dict(details.get("Regularisers", {}))
        regularisers.pop("penalties_and_blur_act_on", None)
        if not regularisers.get("fourier"):  # parameters of regularisers that are off say nothing
            regularisers.pop("fourier_decay", None)
        if not regularisers.get("blur_every"):
            regularisers.pop("blur_sigma", None)
        used = ", ".join(f"{k} {v}" for k, v in regularisers.items() if v not in (0, 0.0, False, None))
        caption = (f"{png.stem.removeprefix('featurevis_')}: {details.get('Iterations', '?')} Adam steps "
                   f"(lr {details.get('LearningRate', '?')}), logit {details.get('ObjectiveValueStart', float('nan')):.3g} "
                   f"-> {details.get('ObjectiveValue', float('nan')):.3g}; regularisers: {used or 'none'}.")
        parts.append(figure(png.read_bytes(), caption))
    return "\n".join(parts)


def _explain_method_sections(mode: ModeLayout, classes: list[str]) -> str:
    """The out-of-fold maps of the --explain methods (one subfolder each)."""
    parts = []
    for folder in mode.explain_dirs():
        desc = folder.name.removeprefix("explain-")
        summary = read_json(folder / "explanation_summary.json") if (folder / "explanation_summary.json").exists() else {}
        method = summary.get("method", desc)
        parts += [heading(3, f"Out-of-fold {method} maps"),
                  _class_heatmaps_section(folder, classes, desc, f"{method} map"),
                  _explanation_section(folder, f"{method}: explanation metrics"), _regions_section(folder)]
    return "\n".join(p for p in parts if p)


def _learning_curves_section(mode: ModeLayout, cv: pd.DataFrame) -> str:
    files = sorted(mode.history_dir.glob("fold-*_history.tsv"),
                   key=lambda p: int(re.sub(r"\D", "", p.name.split("_")[0]) or 0))
    if not files:
        return ""
    histories = {f"fold {p.name.split('_')[0].removeprefix('fold-')}": read_tsv(p) for p in files}
    final = mode.final_history
    if final.exists():
        histories["final model"] = read_tsv(final)
    selected = {}
    if {"fold", "selected_epoch"} <= set(cv.columns):
        selected = {f"fold {int(f)}": int(e) for f, e in zip(cv["fold"], cv["selected_epoch"]) if pd.notna(e)}
    png = charts.learning_curves(histories, selected)
    caption = ("Per fold: training (dashed) and validation (solid) loss, balanced accuracy and fraction of "
               "z+ relevance inside the brain mask; dots: the epoch each fold selected; black: the final "
               "model trained on all participants.")
    return heading(3, "Learning curves") + figure(png, caption)


def _confusion_section(oof: pd.DataFrame, classes: list[str]) -> str:
    if not {"true_label", "predicted_label"} <= set(oof.columns):
        return ""
    true, predicted = oof["true_label"].astype(str).tolist(), oof["predicted_label"].astype(str).tolist()
    classes = [str(c) for c in classes] or sorted(set(true) | set(predicted))
    classes += sorted((set(true) | set(predicted)) - set(classes))
    png = charts.confusion_matrix(true, predicted, classes)
    return (heading(3, "Confusion matrix") +
            figure(png, "Out-of-fold predictions of every participant (rows: true class; share of the row in "
                        "brackets)."))


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """Nested JSON as (key path, value) rows, whatever its layout."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}{k} / ")]
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return [(prefix.removesuffix(" / "), value)]


def _explanation_section(mode_dir: Path, title: str = "Explanation metrics") -> str:
    table_path, summary_path = mode_dir / "explanation_metrics.tsv", mode_dir / "explanation_summary.json"
    if not table_path.exists() and not summary_path.exists():
        return ""
    parts = [heading(3, title)]
    if table_path.exists():
        metrics = read_tsv(table_path)
        columns = numeric_columns(metrics)
        if columns:
            values = _as_numbers(metrics, columns)
            means = [values.mean().rename("all")]
            if "true_label" in metrics:
                means += [rows.mean().rename(f"true {label}") for label, rows in values.groupby(metrics["true_label"])]
            table = pd.DataFrame(means).reset_index(names="participants")
            parts.append(paragraph(f"Means over the participants ({len(metrics)} rows of {table_path.name})."))
            parts.append(data_table(table))
            tissue = charts.tissue_relevance(metrics)
            if tissue:
                parts.append(figure(tissue, "Share of positive relevance per tissue class (template GM/WM/CSF "
                                            "probabilities inside the brain mask) and outside the brain."))
            parts.append(figure(charts.metric_strips(metrics, columns),
                                "Every participant (points) by true class; bars: means."))
        else:
            parts.append(paragraph(f"{table_path.name} has no numeric columns.", "note"))
    if summary_path.exists():
        rows = [(k, v) for k, v in _flatten(read_json(summary_path)) if k]
        parts.append(f"<details><summary>{escape(summary_path.name)}</summary>{key_value_table(rows)}</details>")
    return "\n".join(parts)


def _participants_section(oof: pd.DataFrame, output_dir: Path) -> str:
    links = {}
    if "participant_id" in oof:
        links["participant_id"] = {p: f"../{p}.html" for p in oof["participant_id"].astype(str)
                                   if (output_dir / f"{p}.html").exists()}
    return (heading(3, "Participants (out-of-fold)") +
            paragraph("Participant labels link to the participant reports.", "note") +
            data_table(oof, links))


def _outside_flip_rate(summary: dict) -> float | None:
    rates = [v for k, v in (summary.get("flip_rates") or {}).items() if k.startswith("outside_") and v is not None]
    return max(rates) if rates else None


def _warnings(mode: str, summary: dict) -> list[str]:
    """Plain warnings that no heat map can overrule."""
    out = []
    rate = _outside_flip_rate(summary)
    if rate is not None and rate > FLIP_RATE_WARNING:
        inside = summary.get("relevance_inside_mask_mean")
        share = f" although {100 * inside:.1f} % of its z+ relevance lies inside the brain" if inside is not None else ""
        out.append(paragraph(
            f"Warning: {100 * rate:.0f} % of the held-out decisions of mode {mode} change when everything outside "
            f"the brain is replaced (threshold {100 * FLIP_RATE_WARNING:.0f} %){share}. This model relies on what "
            f"lies outside the brain; relevance inside the brain is not evidence of reliance on the brain. "
            f"{FLIP_RATE_ADVICE}", "warn"))
    chance = summary.get("chance") or {}
    if chance.get("near_chance"):
        out.append(paragraph(
            f"Warning: the pooled out-of-fold balanced accuracy of mode {mode} "
            f"({format_value(summary.get('pooled_oof_balanced_accuracy'))}) is not distinguishable from chance "
            f"(binomial p = {chance['p_value']:.2f}); its maps explain a model that may not have learned the target. "
            f"{NEAR_CHANCE_ADVICE}", "warn"))
    return out


def _dependence_section(summary: dict) -> str:
    rates = summary.get("flip_rates") or {}
    if not rates:
        return ""
    rows = []
    for key, rate in rates.items():
        region, fill = key.rsplit("_", 1)
        rows.append({"region replaced": region, "replaced by": {"zero": "0", "mean": "training mean image"}.get(fill, fill),
                     "held-out decisions that flip": rate if rate is not None else float("nan")})
    return (heading(3, "Decision dependence") +
            paragraph("For every held-out participant, the region is replaced and the out-of-fold model decides "
                      "again: the share of decisions that change measures what the decision rests on (a heat map "
                      "only shows where relevance falls). Per participant: prob_change_* and flip_* columns of "
                      "explanation_metrics.tsv.", "note") +
            data_table(pd.DataFrame(rows)))


def render_mode_section(mode_dir: Path, output_dir: Path) -> str:
    layout = ModeLayout(Path(mode_dir))
    mode = layout.mode
    LOG.info("report: rendering group mode %s", mode)
    cv = read_tsv(layout.cv_metrics_tsv)
    summary = read_json(layout.cv_metrics_json) if layout.cv_metrics_json.exists() else {}
    oof_path = layout.oof_predictions_tsv
    oof = read_tsv(oof_path) if oof_path.exists() else pd.DataFrame()
    classes = list(summary.get("classes") or (sorted(oof["true_label"].astype(str).unique())
                                              if "true_label" in oof else []))
    parts = [f'<section id="mode-{escape(mode)}">', heading(2, f"mode-{mode}: {MODE_TITLES.get(mode, mode)}"),
             *_warnings(mode, summary), _dependence_section(summary), _cv_section(layout), _class_heatmaps_section(layout.root, classes),
             _learning_curves_section(layout, cv), _featurevis_section(layout)]
    if not oof.empty:
        parts.append(_confusion_section(oof, classes))
    parts += [_explanation_section(layout.root), _regions_section(layout.root), _explain_method_sections(layout, classes),
              counterfactual_section(layout)]
    if not oof.empty:
        parts.append(_participants_section(oof, output_dir))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _overview(layout: GroupLayout, modes: list[ModeLayout]) -> str:
    rows = []
    for mode in modes:
        path = mode.cv_metrics_json
        summary = read_json(path) if path.exists() else {}
        mean, sd = summary.get("balanced_accuracy_mean"), summary.get("balanced_accuracy_sd")
        rows.append({
            "mode": mode.mode,
            "folds": summary.get("folds", "n/a"),
            "balanced accuracy (mean ± sd over folds)":
                f"{format_value(mean)} ± {format_value(sd)}" if mean is not None else "n/a",
            "pooled out-of-fold balanced accuracy": summary.get("pooled_oof_balanced_accuracy", float("nan")),
            "relevance inside brain mask (mean)": summary.get("relevance_inside_mask_mean", float("nan")),
            "decisions flipped by replacing the outside of the brain": _outside_flip_rate(summary) if
            _outside_flip_rate(summary) is not None else float("nan"),
        })
    overview = heading(2, "Overview") + data_table(pd.DataFrame(rows))
    side_by_side = layout.modes_summary
    if side_by_side.exists():  # written by the group training: mean explanation metrics too
        overview += paragraph(f"{side_by_side.name}:") + data_table(read_tsv(side_by_side))
    return overview


def write_group_report(output_dir: str | os.PathLike) -> Path:
    """Render ``output_dir/group/report.html`` from the group outputs (atomically)."""
    output_dir = Path(output_dir)
    layout = GroupLayout(output_dir)
    modes = layout.trained_modes()
    if not modes:
        raise ValueError(f"{layout.root}: no mode-*/cv_metrics.tsv to report on")
    body = _overview(layout, modes) + "\n".join(render_mode_section(m.root, output_dir) for m in modes)
    nav = [(f"#{m.root.name}", m.root.name) for m in modes]
    path = write_page(layout.report, "grazbids: group report", body, nav)
    LOG.info("group report written to %s", path)
    return path
