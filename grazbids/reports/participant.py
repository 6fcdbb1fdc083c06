"""Participant report ``output_dir/sub-<label>.html``: one section per T1w image.

A section is rendered per T1w (in parallel, by the workflow) as an HTML fragment; the
report joins the fragments of one participant. Everything shown is read back from the
derivatives just written (and their sidecars), so the report shows what was saved.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from ..evaluate.metrics import fraction_inside, fraction_per_tissue
from . import brain_figures as bf
from .counterfactual import counterfactual_maps, participant_section
from .html import (
    Raw, escape, figure, heading, key_value_table, link, paragraph, probability_bar,
    relative_href, write_page,
)

LOG = logging.getLogger("grazbids.reports")
# Brain-mask Dice below which the registration deserves a look (the target that 36 of
# the 37 ds002748 subjects reach with affine registration, docs/preprocessing.md).
DICE_TARGET = 0.94
GROUP_REPORT = Path("group") / "report.html"


@dataclass
class T1wOutputs:
    """Derivative paths of one T1w (template space unless named otherwise)."""

    source_file: str
    t1w: str
    brain_mask: str
    probsegs: dict[str, str] = field(default_factory=dict)  # tissue label -> probseg
    subject_mask: str | None = None  # the subject's brain mask registered (QC), if kept
    t1w_sidecar: str | None = None
    xfm_sidecar: str | None = None
    heatmap: str | None = None
    predictions: str | None = None
    derivatives: list[str] = field(default_factory=list)
    explanations: dict[str, str] = field(default_factory=dict)  # --explain maps: desc -> template-space map
    template_mask: str | None = None  # the template's mask when brain_mask is the participant's own
    t1w_native: str | None = None  # raw T1w
    brain_mask_native: str | None = None
    dseg_native: str | None = None
    # counterfactual simulator outputs (template space): direction -> {"T1w": ..., "logjacobian": ...}
    counterfactuals: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def reference_mask(self) -> str:
        """The template's brain mask (registration check outline)."""
        return self.template_mask or self.brain_mask


def explanation_maps(t1w_template: str, paths) -> dict[str, str]:
    """The template-space --explain maps among ``paths`` (desc -> path): the
    ``desc-<method>_heatmap`` files beside ``t1w_template`` with its space entities, z+ excepted."""
    stem = Path(t1w_template).name.removesuffix("_desc-preproc_T1w.nii.gz")
    pattern = re.compile(rf"^{re.escape(stem)}_desc-([a-zA-Z0-9]+)_heatmap\.nii\.gz$")
    found = {}
    for path in paths:
        match = pattern.match(Path(path).name)
        if match and match.group(1) != "zplus":
            found[match.group(1)] = str(path)
    return dict(sorted(found.items()))


def section_id(source_file: str) -> str:
    """Anchor of a T1w's section: its raw file name without extension."""
    name = Path(source_file).name
    return re.sub(r"\.nii(\.gz)?$", "", name)


def read_sidecar(path: str | None) -> dict:
    if not path or not Path(path).exists():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable JSON sidecar ({err})") from None


def sidecar_of(path: str) -> str:
    return re.sub(r"\.(nii\.gz|nii|tsv|h5)$", ".json", str(path))


def _data(path: str) -> np.ndarray:
    try:
        return np.asanyarray(nb.load(str(path)).dataobj, dtype=np.float64)
    except Exception as err:  # nibabel raises many types for bad files
        raise ValueError(f"{path}: cannot read the image for the report ({err})") from None


def _subject_mask(outputs: T1wOutputs) -> tuple[str | nb.Nifti1Image, str]:
    """The registered subject brain mask, or (without it) the registered T1w > 0."""
    if outputs.subject_mask and outputs.template_mask:
        return outputs.subject_mask, "participant's brain-extraction mask registered to the template"
    if outputs.subject_mask:
        return outputs.subject_mask, "subject brain mask (T1w > 0) registered to the template"
    img = nb.load(outputs.t1w)
    mask = (np.asanyarray(img.dataobj) > 0).astype(np.uint8)
    return nb.Nifti1Image(mask, img.affine), "registered T1w > 0"


def _summary(outputs: T1wOutputs, t1w_meta: dict, xfm_meta: dict) -> str:
    sources = t1w_meta.get("Sources") or [Path(outputs.source_file).name]
    rows: list[tuple[str, object]] = [
        ("T1w image", sources[0]),
        ("Template", t1w_meta.get("SpatialReference", "not recorded")),
        ("Resolution", t1w_meta.get("Resolution", "not recorded")),
        ("Registration", xfm_meta.get("RegistrationType", "not recorded")),
    ]
    if xfm_meta.get("Stages"):
        rows.append(("Registration stages", " + ".join(xfm_meta["Stages"])))
    for key, label in (("Metric", "Registration metric"), ("Software", "Software"),
                       ("RandomSeed", "Random seed")):
        if key in xfm_meta:
            rows.append((label, xfm_meta[key]))
    extraction = t1w_meta.get("BrainExtraction") or {}
    if extraction.get("Method"):
        volume = f" ({extraction['VolumeMl']:.0f} ml)" if "VolumeMl" in extraction else ""
        rows.append(("Brain extraction", f"{extraction['Method']}{volume}"))
    if "BiasFieldCorrection" in t1w_meta:
        rows.append(("Bias-field correction", t1w_meta["BiasFieldCorrection"]))
    if "SkullStripped" in t1w_meta:
        rows.append(("Skull-stripped (BIDS SkullStripped)", bool(t1w_meta["SkullStripped"])))
    dice = (t1w_meta.get("RegistrationQC") or {}).get("BrainMaskDice")
    if dice is None:
        rows.append(("Brain-mask Dice", "not recorded"))
    else:
        flag = (f' <span class="warn">below {DICE_TARGET}: check the registration</span>'
                if dice < DICE_TARGET else "")
        rows.append(("Brain-mask Dice (template vs registered subject mask)", Raw(f"{dice:.4f}{flag}")))
    return key_value_table(rows)


def _registration_check(outputs: T1wOutputs) -> str:
    outlines = [(outputs.reference_mask, bf.TEMPLATE_MASK_COLOUR)]
    if "WM" in outputs.probsegs:
        outlines.append((outputs.probsegs["WM"], bf.WM_COLOUR))
    png = bf.anatomy_figure(outputs.t1w, mask_img=outputs.reference_mask, title="T1w in template space",
                            outlines=outlines)
    caption = ("The participant's T1w after registration, with the template's brain mask (red)"
               + (" and white-matter boundary (WM probability 0.5, blue)" if len(outlines) > 1 else "")
               + ". The outlines should follow the brain's edge and the grey/white boundary.")
    return figure(png, caption)


def _input_figure(outputs: T1wOutputs) -> str:
    mask, what = _subject_mask(outputs)
    png = bf.anatomy_figure(outputs.t1w, mask_img=outputs.brain_mask, title="network input",
                            outlines=[(outputs.reference_mask, bf.TEMPLATE_MASK_COLOUR),
                                      (mask, bf.SUBJECT_MASK_COLOUR)])
    red = ("the template brain mask (red); the participant's mask is the one used for training and relevance"
           if outputs.template_mask else "the template brain mask used for training and relevance (red)")
    return figure(png, f"Template-space T1w (the network's input) with the {what} (green) and {red}.")


def _extraction_figures(outputs: T1wOutputs) -> str:
    """Brain-mask outline on the raw T1w, and the tissue segmentation's boundaries."""
    raw = nb.load(outputs.t1w_native)
    if raw.ndim == 4:
        raw = raw.slicer[..., 0]
    mask_img = nb.load(outputs.brain_mask_native)
    parts = [figure(bf.anatomy_figure(raw, mask_img=mask_img, title="brain extraction on the raw T1w",
                                      outlines=[(mask_img, bf.SUBJECT_MASK_COLOUR)]),
                    "The participant's raw T1w with the outline of its brain mask (green). The outline "
                    "should follow the brain's edge: not cut into cortex or cerebellum, not include "
                    "skull, dura, eyes or neck.")]
    if outputs.dseg_native:
        dseg_img = nb.load(outputs.dseg_native)
        labels = np.asanyarray(dseg_img.dataobj)
        gm_wm = nb.Nifti1Image((labels >= 2).astype(np.uint8), dseg_img.affine)
        wm = nb.Nifti1Image((labels == 3).astype(np.uint8), dseg_img.affine)
        png = bf.anatomy_figure(raw, mask_img=mask_img, title="tissue segmentation",
                                outlines=[(mask_img, bf.SUBJECT_MASK_COLOUR), (gm_wm, bf.TEMPLATE_MASK_COLOUR),
                                          (wm, bf.WM_COLOUR)])
        parts.append(figure(png, "The participant's own tissue segmentation (dseg): brain mask (green), "
                                 "outer grey-matter boundary (red) and grey/white boundary (blue)."))
    return "".join(parts)


def _prediction(path: str) -> str:
    try:
        table = pd.read_csv(path, sep="\t", dtype=str)
    except (OSError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: unreadable predictions table ({err})") from None
    if table.empty or "predicted_label" not in table:
        raise ValueError(f"{path}: no predicted_label row")
    row = table.iloc[0]
    probabilities = [(c.removeprefix("probability_"), float(row[c])) for c in table.columns
                     if c.startswith("probability_")]
    rows = [("Predicted class", Raw(f"<strong>{escape(row['predicted_label'])}</strong>"))]
    rows += [(f"P({name})", probability_bar(p)) for name, p in probabilities]
    fills = {"outside_zero": "the outside of the brain set to 0",
             "outside_mean": "the outside of the brain set to the training mean image"}
    warnings = []
    for region, what in fills.items():  # decision dependence (grazbids.explain.dependence)
        if f"flip_{region}" in table:
            flipped = row[f"flip_{region}"] == "1"
            change = float(row[f"prob_change_{region}"])
            rows.append((f"With {what}", f"{'decision flips' if flipped else 'same decision'} "
                                         f"(P(predicted) {change:+.3f})"))
            if flipped:
                warnings.append(what)
    out = key_value_table(rows)
    if warnings:
        out += paragraph("Warning: this decision changes with " + " and with ".join(warnings) + ": it rests on "
                         "what lies outside the brain, whatever the heat map shows.", "warn")
    return out


def _relevance(outputs: T1wOutputs, heatmap: str, title: str = "z+ relevance") -> str:
    heat = _data(heatmap)
    brain = _data(outputs.brain_mask) > 0.5
    if heat.shape != brain.shape:
        raise ValueError(f"{heatmap}: grid {heat.shape} differs from the brain mask's {brain.shape}")
    rows: list[tuple[str, object]] = [("Positive relevance inside the brain mask", fraction_inside(heat, brain))]
    if outputs.probsegs:
        shares = fraction_per_tissue(heat, {t: _data(p) for t, p in outputs.probsegs.items()}, brain)
        rows += [(f"… in {t}" if t != "outside" else "… outside the brain mask", v) for t, v in shares.items()]
    meta = read_sidecar(sidecar_of(heatmap))
    for key, label in (("ModelTrainingMode", "Model training mode"), ("ModelTargetColumn", "Model target"),
                       ("Method", "Method"), ("ExplainedClass", "Explained output")):
        if key in meta:
            rows.append((label, meta[key]))
    png = bf.heatmap_figure(heatmap, outputs.t1w, mask_img=outputs.brain_mask,
                            title=title, outlines=[(outputs.brain_mask, bf.TEMPLATE_MASK_COLOUR)])
    caption = (f"{title} over the template-space T1w (positive values); the views cut through its peak, "
               f"values below {bf.HEAT_THRESHOLD_SHARE:.0%} of the colour maximum are not drawn; "
               "red: template brain mask.")
    return key_value_table(rows) + figure(png, caption)


def render_t1w_section(outputs: T1wOutputs, output_dir: str | os.PathLike) -> str:
    """HTML fragment for one T1w; links are relative to `output_dir` (the report's folder)."""
    anchor = section_id(outputs.source_file)
    LOG.info("report: rendering %s", anchor)
    t1w_meta, xfm_meta = read_sidecar(outputs.t1w_sidecar), read_sidecar(outputs.xfm_sidecar)
    parts = [f'<section id="{escape(anchor)}">', heading(2, anchor),
             heading(3, "Summary"), _summary(outputs, t1w_meta, xfm_meta),
             *([heading(3, "Brain mask and tissue segmentation (native space)"), _extraction_figures(outputs)]
               if outputs.t1w_native and outputs.brain_mask_native else []),
             heading(3, "Registration check"), _registration_check(outputs),
             heading(3, "Input in template space"), _input_figure(outputs)]
    if outputs.predictions:
        parts += [heading(3, "Prediction"), _prediction(outputs.predictions)]
    if outputs.heatmap:
        parts += [heading(3, "Relevance (z+ heat map)"), _relevance(outputs, outputs.heatmap)]
    for desc, path in outputs.explanations.items():
        method = read_sidecar(sidecar_of(path)).get("MethodName", desc)
        parts += [heading(3, f"Explanation: {method}"), _relevance(outputs, path, f"{method} map")]
    if outputs.counterfactuals:
        parts.append(participant_section(outputs.t1w, outputs.brain_mask, outputs.counterfactuals))
    if outputs.derivatives:
        items = "".join(f"<li>{link(relative_href(p, output_dir), Path(p).name)}</li>"
                        for p in sorted(set(outputs.derivatives)))
        parts += [heading(3, "Derivatives"), f'<ul class="files">{items}</ul>']
    parts.append("</section>")
    return "\n".join(parts)


def write_participant_report(subject: str, sections: list[str], output_dir: str | os.PathLike) -> Path:
    """Join the T1w sections into ``output_dir/sub-<label>.html`` (atomically)."""
    subject = subject.removeprefix("sub-")
    if not sections:
        raise ValueError(f"sub-{subject}: no report sections to write")
    output_dir = Path(output_dir)
    anchors = re.findall(r'<section id="([^"]+)">', "\n".join(sections))
    nav = [(f"#{a}", a) for a in anchors] if len(anchors) > 1 else []
    nav.append((GROUP_REPORT.as_posix(), "group report"))
    intro = paragraph(f"{len(sections)} T1w image(s). Files and links are relative to the derivatives "
                      "folder; the group report exists once the group level has run.", "note")
    path = write_page(output_dir / f"sub-{subject}.html", f"grazbids: sub-{subject}",
                      intro + "\n".join(sections), nav)
    LOG.info("sub-%s: report written to %s", subject, path)
    return path


def discover_t1w_outputs(output_dir: str | os.PathLike, subject: str) -> list[T1wOutputs]:
    """The outputs of every T1w of a participant found in a derivatives folder (to render
    reports for outputs written before reports existed)."""
    output_dir, subject = Path(output_dir), subject.removeprefix("sub-")
    found = []
    for t1w in sorted((output_dir / f"sub-{subject}").rglob("*_desc-preproc_T1w.nii.gz")):
        stem = t1w.name.removesuffix("_desc-preproc_T1w.nii.gz")
        match = re.search(r"_space-([a-zA-Z0-9]+)(?:_res-[a-zA-Z0-9]+)?$", stem)
        if not match:
            continue
        raw_stem = stem[: match.start()]
        space = match.group(1)
        mask = t1w.with_name(f"{stem}_desc-brain_mask.nii.gz")
        if not mask.exists():
            raise ValueError(f"{t1w}: brain mask {mask.name} is missing")
        probsegs = {t: str(p) for t in ("GM", "WM", "CSF")
                    if (p := t1w.with_name(f"{stem}_label-{t}_probseg.nii.gz")).exists()}
        heat = t1w.with_name(f"{stem}_desc-zplus_heatmap.nii.gz")
        predictions = next(iter(sorted(t1w.parent.glob(f"{raw_stem}_desc-*_predictions.tsv"))), None)
        xfm = t1w.with_name(f"{raw_stem}_from-T1w_to-{space}_mode-image_xfm.json")
        found.append(T1wOutputs(
            source_file=f"{raw_stem}_T1w.nii.gz", t1w=str(t1w), brain_mask=str(mask), probsegs=probsegs,
            t1w_sidecar=sidecar_of(str(t1w)), xfm_sidecar=str(xfm) if xfm.exists() else None,
            heatmap=str(heat) if heat.exists() else None,
            predictions=str(predictions) if predictions else None,
            derivatives=[str(p) for p in sorted(t1w.parent.glob(f"{raw_stem}_*")) if p.suffix != ".json"],
            explanations=explanation_maps(str(t1w), t1w.parent.glob(f"{stem}_desc-*_heatmap.nii.gz")),
            counterfactuals=counterfactual_maps(str(t1w), t1w.parent.glob(f"{stem}_desc-*.nii.gz")),
        ))
    return found
