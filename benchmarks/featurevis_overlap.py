"""Does a model's feature visualisation overlap a known effect region? (manual check)

    python benchmarks/featurevis_overlap.py BUNDLE EFFECT_MASK --class patient [--iterations 200] [--out DIR]

BUNDLE: a grazbids model bundle (e.g. group/mode-grazplus/model of the shortcut benchmark);
EFFECT_MASK: the effect region on the model's template grid (e.g. a patient's
``space-<template>_res-<res>_desc-effect_mask`` from ``grazbids-simulate``). Runs the group
level's recipe (grazbids.interfaces.featurevis.GROUP_REGULARISERS) from noise and from the
template T1w, and prints per run, inside the template brain mask:

* ``positive_share_in_effect``: share of the image's positive mass (noise start) or of the
  positive change from the start (template start) inside the effect region;
* ``negative_share_in_effect``: the same for the negative change (a hypointense lesion
  should be darkened where the network looks for it);
* ``effect_share_of_brain``: the region's share of the brain voxels, what an even map gives;
* ``mean_inside`` / ``mean_outside`` / ``mean_mirror``: mean value (noise start) or change
  (template start) inside the region, in the rest of the brain, and in the mirror image of
  the region in the other hemisphere (symmetric templates).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grazbids.featurevis import AscentSettings, Regularisers  # noqa: E402
from grazbids.featurevis.from_bundle import visualise_bundle  # noqa: E402
from grazbids.interfaces.featurevis import GROUP_REGULARISERS  # noqa: E402
from grazbids.templates import get_template  # noqa: E402


def _share(values: np.ndarray, region: np.ndarray) -> float:
    total = values.sum()
    return float(values[region].sum() / total) if total > 0 else float("nan")


def mirrored(mask: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """The mask flipped left-right about x = 0 (the other hemisphere), when the grid is
    axis-aligned and symmetric about x = 0 (as the symmetric MNI templates); else None."""
    n, step, origin = mask.shape[0], affine[0, 0], affine[0, 3]
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or not np.isclose(
            origin + step * (n - 1), -origin):
        return None
    return mask[::-1]


def overlap(image: np.ndarray, start: np.ndarray | None, effect: np.ndarray, brain: np.ndarray,
            affine: np.ndarray) -> dict:
    shown = image - start if start is not None else image
    inside, outside = effect & brain, brain & ~effect
    mirror = mirrored(effect, affine)
    return {
        # the same region in the other hemisphere: a like-for-like contrast for the effect
        "mean_mirror": float(shown[mirror & brain].mean()) if mirror is not None else float("nan"),
        "positive_share_in_effect": _share(np.clip(shown, 0, None) * brain, inside),
        "negative_share_in_effect": _share(np.clip(-shown, 0, None) * brain, inside),
        "effect_share_of_brain": float(inside.sum() / brain.sum()),
        "mean_inside": float(shown[inside].mean()),
        "mean_outside": float(shown[outside].mean()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("effect_mask", type=Path)
    parser.add_argument("--class", dest="cls", required=True)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("featurevis_overlap"))
    args = parser.parse_args(argv)

    card = json.loads((args.bundle / "model_card.json").read_text())
    template = get_template(card["input"]["template"], card["input"]["resolution"])
    brain_img = nb.load(str(template.brain_mask))
    brain = np.asanyarray(brain_img.dataobj) > 0.5
    effect = np.asanyarray(nb.load(str(args.effect_mask)).dataobj) > 0.5
    regularisers = Regularisers(**GROUP_REGULARISERS)
    for start in ("noise", "image"):
        settings = AscentSettings(iterations=args.iterations, start=start, regularisers=regularisers)
        t0 = time.perf_counter()
        out = visualise_bundle(args.bundle, args.out / start, args.cls, settings,
                               start_image="template" if start == "image" else None, device="cpu")
        result = out.result
        start_image = result.start_image.numpy() if start == "image" else None
        print(json.dumps({"start": start, "class": args.cls, "iterations": args.iterations,
                          "logit_start": round(result.start_value, 4), "logit_end": round(result.objective_value, 4),
                          **{k: round(v, 5) for k, v in overlap(result.image.numpy(), start_image, effect, brain, brain_img.affine).items()},
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
