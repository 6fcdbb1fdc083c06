"""Brain extraction of raw T1w heads, measured against reference masks.

    nice python benchmarks/bench_brain_extraction.py [--ixi ../shared/data/ixi-heads]
        [--stripped ../shared/data/ds002748/sub-01/anat/sub-01_T1w.nii.gz] [--json-out rows.json]

For every IXI head (reference masks under derivatives/masks/, used here only to score):

* `deepbet+N4`: what the participant level runs (N4, then deepbet on the corrected image);
* `deepbet raw`: deepbet on the raw image;
* `template affine`: the template's brain mask brought to the head by an affine
  registration of the whole head (intensities only), i.e. the atlas/registration-based
  extraction grazbids had before (no head template ships offline, only a brain one).

Per method: Dice with the reference, mask volume, wall and CPU seconds (extraction only,
N4 timed separately). For a brain-extracted scan (`--stripped`), deepbet's mask is scored
against the scan's own brain (T1w > 0): Dice and the share of the brain it removes
("eats into the brain"). Last line: JSON summary (min / median / max per method).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from grazbids.interfaces.masks import brain_mask_from_t1w, dice
from grazbids.interfaces.skullstrip import extract_brain, n4_correct


def _timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def template_affine_mask(t1w_file: str, workdir: Path) -> np.ndarray:
    """The template brain mask through an affine registration of the whole head."""
    from grazbids.interfaces.registration import ApplyTransforms, RegisterToTemplate
    from grazbids.templates import get_template

    template = get_template("MNI152NLin2009aSym", 2)
    reg = RegisterToTemplate(fixed_image=str(template.t1w), fixed_mask=str(template.brain_mask),
                             moving_image=t1w_file, registration="affine", random_seed=42)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = reg.run(cwd=str(workdir)).outputs
        warped = ApplyTransforms(input_image=str(template.brain_mask), reference_image=t1w_file,
                                 transforms=result.reverse_transforms,
                                 interpolation="nearestNeighbor", output_dtype="uint8",
                                 out_file="mask.nii.gz").run(cwd=str(workdir)).outputs
    finally:
        os.chdir(cwd)
    return np.asanyarray(nb.load(warped.output_image).dataobj) > 0


def volume_ml(mask, img) -> float:
    return float(mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ixi", type=Path, default=Path("../shared/data/ixi-heads"))
    parser.add_argument("--stripped", type=Path,
                        default=Path("../shared/data/ds002748/sub-01/anat/sub-01_T1w.nii.gz"))
    parser.add_argument("--participants", nargs="*", help="IXI labels (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ITK threads")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    rows = []
    subjects = sorted(p.name for p in args.ixi.glob("sub-*") if p.is_dir())
    if args.participants:
        subjects = [s for s in subjects if s.removeprefix("sub-") in args.participants]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in subjects:
            t1w = args.ixi / sub / "anat" / f"{sub}_T1w.nii.gz"
            ref_file = args.ixi / "derivatives" / "masks" / sub / "anat" / f"{sub}_desc-brain_mask.nii.gz"
            img = nb.load(t1w)
            reference = np.asanyarray(nb.load(ref_file).dataobj) > 0
            corrected, n4_wall, n4_cpu = _timed(n4_correct, str(t1w), str(tmp / "n4.nii.gz"))
            masks = {}
            masks["deepbet+N4"] = _timed(extract_brain, nb.load(corrected))
            masks["deepbet raw"] = _timed(extract_brain, img)
            workdir = tmp / sub
            workdir.mkdir()
            masks["template affine"] = _timed(template_affine_mask, str(t1w), workdir)
            for method, (mask, wall, cpu) in masks.items():
                row = dict(participant=sub, method=method, dice=round(dice(mask, reference), 4),
                           volume_ml=round(volume_ml(mask, img), 1),
                           reference_ml=round(volume_ml(reference, img), 1),
                           wall_s=round(wall, 1), cpu_s=round(cpu, 1),
                           n4_wall_s=round(n4_wall, 1) if method == "deepbet+N4" else None)
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.stripped.exists():
            img = nb.load(args.stripped)
            brain = brain_mask_from_t1w(np.asanyarray(img.dataobj))
            for method, source in (("deepbet+N4", "n4"), ("deepbet raw", "raw")):
                path = str(args.stripped)
                if source == "n4":
                    path = n4_correct(path, str(tmp / "stripped_n4.nii.gz"))
                mask, wall, cpu = _timed(extract_brain, nb.load(path))
                row = dict(participant=str(args.stripped.name), method=method, stripped_input=True,
                           dice=round(dice(mask, brain), 4),
                           brain_removed_share=round(float((brain & ~mask).sum() / brain.sum()), 4),
                           volume_ml=round(volume_ml(mask, img), 1),
                           reference_ml=round(volume_ml(brain, img), 1), wall_s=round(wall, 1),
                           cpu_s=round(cpu, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    heads = [r for r in rows if not r.get("stripped_input")]
    for method in dict.fromkeys(r["method"] for r in heads):
        values = [r for r in heads if r["method"] == method]
        for key in ("dice", "wall_s", "cpu_s"):
            v = np.array([r[key] for r in values])
            summary.setdefault(method, {})[key] = [float(v.min()), float(np.median(v)), float(v.max())]
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
