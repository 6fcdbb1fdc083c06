"""Counterfactual sections of the reports, read back from what grazbids.counterfactual wrote.

Participant: the template-space T1w beside the simulated images (``desc-inject`` /
``desc-remove``), their log-Jacobian maps and the classifier's probabilities before and
after the warp (from the sidecars). Group: per mode, the group-mean log-Jacobian maps per
class and direction, the simulator's training summary and the per-region means. A section
is rendered only when those files exist.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from ..group.layout import ModeLayout
from . import brain_figures as bf
from .html import data_table, escape, figure, heading, key_value_table, paragraph

DIRECTIONS = ("inject", "remove")
GROUP_MAP = re.compile(r"^tpl-(?P<tpl>[a-zA-Z0-9]+)_res-(?P<res>[a-zA-Z0-9]+)_class-(?P<cls>[a-zA-Z0-9]+)"
                       r"_desc-(?P<dir>inject|remove)_logjacobian\.nii\.gz$")
TOP_REGIONS = 15
# What every caption must say: the sign convention and what a map of this kind is not.
MEANING = ("log-Jacobian < 0 (blue): the simulator shrinks the tissue there to move the decision; > 0 (red): it "
           "expands it; 0: no change. It shows what changes this classifier's decision, learned by a second "
           "network: not a measurement of atrophy, not ground truth, and not unique (another warp could "
           "move the decision as well).")


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable JSON for the report ({err})") from None


def _sidecar(path: str | Path) -> Path:
    return Path(re.sub(r"\.nii(\.gz)?$", ".json", str(path)))


def _percent(fraction) -> str:
    return "n/a" if fraction is None or not math.isfinite(float(fraction)) else f"{100 * float(fraction):.2f} %"


def _volume_change(log_jacobian: float) -> str:
    """A log-Jacobian as the volume factor a reader can picture."""
    return f"{100 * (math.exp(log_jacobian) - 1):+.1f} %"


# ------------------------------------------------------------------------- participant
def counterfactual_maps(t1w_template: str, paths) -> dict[str, dict[str, str]]:
    """The template-space counterfactual outputs among ``paths``, beside ``t1w_template``
    with its space entities: {direction: {"T1w": simulated image, "logjacobian": map}};
    only directions with both files."""
    stem = Path(t1w_template).name.removesuffix("_desc-preproc_T1w.nii.gz")
    pattern = re.compile(rf"^{re.escape(stem)}_desc-(inject|remove)_(T1w|logjacobian)\.nii\.gz$")
    found: dict[str, dict[str, str]] = {}
    for path in paths:
        match = pattern.match(Path(path).name)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = str(path)
    return {d: found[d] for d in DIRECTIONS if d in found and len(found[d]) == 2}


def _positive_class(meta: dict) -> str:
    """The disease class of the simulator (older sidecars: from the description)."""
    if meta.get("PositiveClass"):
        return str(meta["PositiveClass"])
    match = re.search(r"class '([^']+)'", str(meta.get("Description", "")))
    return match.group(1) if match else str((meta.get("ModelClasses") or ["?"])[-1])


def _probability_row(direction: str, meta: dict, positive: str) -> dict:
    before, after = meta.get("ProbabilitiesBefore") or {}, meta.get("ProbabilitiesAfter") or {}
    row = {"direction": f"{direction} ({'towards' if direction == 'inject' else 'away from'} {positive})",
           "predicted before": meta.get("PredictedBefore", "n/a"), "predicted after": meta.get("PredictedAfter", "n/a"),
           "decision": (f"flips to {meta.get('PredictedAfter')}"
                        if meta.get("PredictedBefore") != meta.get("PredictedAfter") else "unchanged")}
    for name in meta.get("ModelClasses") or sorted(before):
        if name in before and name in after:
            row[f"P({name}) before → after"] = f"{before[name]:.3f} → {after[name]:.3f}"
    if "LogOddsBefore" in meta and "LogOddsAfter" in meta:
        row[f"log-odds of {positive} before → after"] = f"{meta['LogOddsBefore']:+.2f} → {meta['LogOddsAfter']:+.2f}"
    row["folded voxels (brain)"] = _percent(meta.get("FoldedFraction"))
    row["min det(Jacobian)"] = meta.get("MinJacobianDeterminant", float("nan"))
    return row


def _on_target(direction: str, label: str, positive: str) -> bool:
    """Whether a decision is where the direction aims: the disease class for inject, any
    other class for remove."""
    return (label == positive) if direction == "inject" else (label != positive)


def _decision_notes(direction: str, meta: dict, positive: str) -> list[str]:
    """Plain notes on a warp that did not change the decision, moved it the wrong way, or
    had nothing to change."""
    before, after = meta.get("PredictedBefore"), meta.get("PredictedAfter")
    if before is None or after is None:
        return [paragraph(f"{direction}: the classifier's decisions before and after the warp are not recorded "
                          "(sidecar missing or incomplete).", "warn")]
    probabilities = [(meta.get(k) or {}).get(positive) for k in ("ProbabilitiesBefore", "ProbabilitiesAfter")]
    p = f"P({positive}) {probabilities[0]:.3f} → {probabilities[1]:.3f}" if None not in probabilities else "P n/a"
    if _on_target(direction, before, positive):
        if _on_target(direction, after, positive):
            return [paragraph(f"{direction}: the classifier already predicted {before}, where this direction aims "
                              f"({p}); no flip is expected.", "note")]
        return [paragraph(f"Note: the {direction} warp moved the decision the wrong way ({before} → {after}; {p}), "
                          "against its purpose: the simulator does not work for this image, and its maps do not "
                          f"show what makes this classifier call a brain {positive}.", "warn")]
    if before == after:
        return [paragraph(f"Note: the {direction} warp did not flip the decision ({before} before and after; {p}). "
                          "Its maps show what the simulator changed in trying, not a change that is enough to "
                          "move this classifier's decision.", "warn")]
    return []


def participant_section(t1w: str, brain_mask: str, maps: dict[str, dict[str, str]]) -> str:
    """HTML of the counterfactual outputs of one T1w ('' without any)."""
    if not maps:
        return ""
    # a missing sidecar leaves the figures (and says so) rather than losing the section
    metas = {d: _json(_sidecar(files["logjacobian"])) if _sidecar(files["logjacobian"]).exists() else {}
             for d, files in maps.items()}
    positive = _positive_class(next((m for m in metas.values() if m), {}))
    table = data_table(pd.DataFrame([_probability_row(d, m, positive) for d, m in metas.items()]))
    notes = [note for d, m in metas.items() for note in _decision_notes(d, m, positive)]
    images = {"original (template-space T1w)": t1w, **{f"{d}: simulated": maps[d]["T1w"] for d in maps}}
    cuts = ", ".join(f"{z:.0f}" for z in bf.axial_cuts(brain_mask))
    images_png = bf.anatomy_rows_figure(images, mask_img=brain_mask)
    logjac = {f"{d}: log-Jacobian": maps[d]["logjacobian"] for d in maps}
    vmax = bf.robust_abs_max(logjac.values(), brain_mask)
    logjac_png = bf.signed_rows_figure(logjac, {f"{d}: log-Jacobian": maps[d]["T1w"] for d in maps},
                                       mask_img=brain_mask, vmax=vmax)
    folded = "; ".join(f"{d} {_percent(m.get('FoldedFraction'))}" for d, m in metas.items())
    diffeomorphic = any(m.get("Diffeomorphic") for m in metas.values())
    scale = (f"colour scale ±{vmax:.2g} (a local volume change of {_volume_change(vmax)} / {_volume_change(-vmax)})"
             if vmax > 0 else "the maps are 0 everywhere in the brain (the warp is the identity)")
    intro = (f"A simulator network trained against this classifier warped the template-space T1w so that the "
             f"classifier's decision moves: \"inject\" adds what the classifier takes for class {positive}, "
             f"\"remove\" takes it away. The probabilities are the classifier's on the original and on the "
             f"warped image (from the sidecars of the desc-inject/desc-remove outputs).")
    images_caption = (f"The participant's template-space T1w (top) and the simulated images, the same axial slices "
                      f"(z = {cuts} mm) and the same grey scale in every row: compare them slice by slice at the "
                      "edges of ventricles, sulci and the brain, where the warp moves tissue.")
    logjac_caption = (f"Log-Jacobian of each warp (log of the local volume in the simulated image over the "
                      f"original) over that simulated image, {scale}; |values| below "
                      f"{bf.HEAT_THRESHOLD_SHARE:.0%} of it are not drawn. {MEANING} Folded voxels (det <= 0, "
                      f"a warp that is not physically possible; clamped in the map): {folded}"
                      f"{' (diffeomorphic field)' if diffeomorphic else ''}.")
    return "\n".join([heading(3, "Counterfactual simulation"), paragraph(intro, "note"), table, *notes,
                      figure(images_png, images_caption), figure(logjac_png, logjac_caption)])


# ------------------------------------------------------------------------------- group
def _group_maps(folder: Path, summary: dict) -> dict[str, Path]:
    """Row title ("class <c>: <direction>") -> map, inject before remove, classes in the
    summary's order."""
    named = {name: key for key, name in (summary.get("maps") or {}).items()}  # file -> "class/direction"
    classes = [str(c) for c in summary.get("classes") or []]
    found = []
    for path in sorted(folder.glob("tpl-*_logjacobian.nii.gz")):
        match = GROUP_MAP.match(path.name)
        if not match:
            continue
        label = named.get(path.name, f"{match.group('cls')}/{match.group('dir')}")
        cls, direction = label.rsplit("/", 1)
        order = classes.index(cls) if cls in classes else len(classes)
        found.append(((DIRECTIONS.index(direction), order, cls), f"class {cls}: {direction}", path))
    return {title: path for _, title, path in sorted(found)}


def _training_rows(card: dict) -> list[tuple[str, object]]:
    training, arch = card.get("training") or {}, card.get("architecture") or {}
    rows: list[tuple[str, object]] = []
    if "epochs_run" in training:
        rows.append(("epochs run (of requested)", f"{training['epochs_run']} (of {training.get('epochs', '?')})"))
    for key, label in (("learning_rate", "learning rate"), ("batch_size", "batch size"), ("margin", "hinge margin"),
                       ("smoothness_penalty", "smoothness penalty"), ("smoothness_weight", "smoothness weight"), ("cycle_weight", "cycle weight"),
                       ("displacement_weight", "displacement weight"), ("epochs_per_phase", "epochs per phase"),
                       ("seed", "seed")):
        if key in training:
            rows.append((label, training[key]))
    for key, label in (("diffeomorphic", "diffeomorphic field"), ("centre_field", "field centred in the brain"),
                       ("field_downsample", "field downsampling")):
        if key in arch:
            rows.append((label, arch[key]))
    if training.get("collapsed_epoch"):
        rows.append(("stopped: the same field for every input after epoch", training["collapsed_epoch"]))
    for key, value in (training.get("final_epoch") or {}).items():
        if key != "epoch":
            rows.append((f"last epoch: {key.replace('_', ' ')}", value))
    return rows


def _regions_table(path: Path) -> str:
    """Mean log-Jacobian per region, one column per class and direction, the regions with
    the largest |mean| first."""
    try:
        regions = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: unreadable table ({err})") from None
    needed = {"class", "direction", "region", "mean_log_jacobian"}
    if not needed <= set(regions.columns):
        raise ValueError(f"{path}: columns {sorted(needed - set(regions.columns))} missing")
    regions["map"] = "mean log-Jacobian, class " + regions["class"].astype(str) + ": " + regions["direction"]
    wide = regions.pivot_table(index="region", columns="map", values="mean_log_jacobian", aggfunc="first")
    order = wide.abs().max(axis=1).sort_values(ascending=False).index
    # three significant digits: a near-identity warp's means are far below 0.001
    wide = wide.loc[order].map(lambda v: "n/a" if pd.isna(v) else f"{v:+.3g}").reset_index()
    if "n_voxels" in regions:
        wide.insert(1, "voxels", wide["region"].map(regions.groupby("region")["n_voxels"].first()))
    return (heading(4, "Mean log-Jacobian per atlas region") +
            paragraph(f"The {min(TOP_REGIONS, len(wide))} regions with the largest |mean log-Jacobian| (of "
                      f"{len(wide)}; all in {path.parent.name}/{path.name}).", "note") +
            data_table(wide.head(TOP_REGIONS)))


def group_section(mode: ModeLayout) -> str:
    """HTML of the mode's counterfactual outputs ('' when the simulator was not trained)."""
    folder = mode.counterfactual_dir
    summary = _json(folder / "summary.json") if (folder / "summary.json").exists() else {}
    maps = _group_maps(folder, summary) if folder.is_dir() else {}
    if not maps and not summary:
        return ""
    parts = [heading(3, "Counterfactual simulator (group-mean log-Jacobian)")]
    positive = summary.get("positive_class", "the disease class")
    parts.append(paragraph(
        f"A simulator network trained against this mode's final model warps images so that its decision moves: "
        f"\"inject\" (on the correctly classified images of the other classes) adds what the model takes for "
        f"class {positive}, \"remove\" (on those of class {positive}) takes it away. The maps average the "
        "log-Jacobian over the images the simulator was trained on, so they describe those images (in "
        f"sample), not held-out ones. Files in {mode.root.name}/{folder.name}/.", "note"))
    if summary:
        flips = summary.get("flip_fraction") or {}
        rows: list[tuple[str, object]] = [("disease class", positive),
                                          ("images / correctly classified (used)",
                                           f"{summary.get('n_images', '?')} / {summary.get('n_correctly_classified', '?')}")]
        rows += [(f"images in map {key}", n) for key, n in (summary.get("n_per_map") or {}).items()]
        rows += [(f"training decisions flipped by {d} (in sample)", _percent(v) if v is not None else "n/a (no images)")
                 for d, v in flips.items()]
        rows.append(("folded voxels (mean share of the brain)", _percent(summary.get("folded_fraction_mean"))))
        parts.append(key_value_table(rows))
        for direction, value in flips.items():
            if value is not None and value == 0:
                parts.append(paragraph(
                    f"Note: the {direction} warp flipped none of the decisions it was trained on; its mean map "
                    "shows what the simulator changed in trying, not a change that moves this model's decision.",
                    "warn"))
    card_path = mode.model_dir / "simulator" / "simulator_card.json"
    if card_path.exists():
        card = _json(card_path)
        parts.append(f"<details><summary>simulator training ({escape(card_path.relative_to(mode.root))})"
                     f"</summary>{key_value_table(_training_rows(card))}</details>")
        if (card.get("training") or {}).get("collapsed_epoch"):
            parts.append(paragraph("Warning: the simulator training stopped because every input got the same "
                                   "field (a dead network); its maps say nothing about the model.", "warn"))
    if maps:
        first = GROUP_MAP.match(next(iter(maps.values())).name)
        background, mask = bf.template_underlay(first.group("tpl"), first.group("res"), list(maps.values()))
        vmax = bf.robust_abs_max(maps.values(), mask)
        png = bf.signed_rows_figure(maps, background, mask_img=mask, vmax=vmax)
        cuts = ", ".join(f"{z:.0f}" for z in bf.axial_cuts(mask))
        scale = (f"colour scale ±{vmax:.2g} ({_volume_change(vmax)} / {_volume_change(-vmax)} local volume)"
                 if vmax > 0 else "every map is 0 in the brain (the simulator left the images unchanged)")
        counts = {f"class {k.replace('/', ': ')}": n for k, n in (summary.get("n_per_map") or {}).items()}
        titles = "; ".join(f"{title} ({counts[title]} image{'' if counts[title] == 1 else 's'})" if title in counts
                           else title for title in maps)
        caption = (f"Mean log-Jacobian per true class and direction (rows: {titles})"
                   + (" over the template T1w (brain)" if background is not None else "")
                   + f"; the same axial slices (z = {cuts} mm, left of the brain on the left) and the same "
                   f"symmetric {scale} in every row; |values| below {bf.HEAT_THRESHOLD_SHARE:.0%} of it are not "
                   f"drawn. {MEANING} Averaging keeps what the warps share: a pattern that differs between "
                   "participants fades.")
        parts.append(figure(png, caption))
    if (folder / "regions.tsv").exists():
        parts.append(_regions_table(folder / "regions.tsv"))
    return "\n".join(parts)

