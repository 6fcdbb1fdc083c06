"""Manual check: feature visualisation of a model trained on a simulated lesion cohort.

    python benchmarks/featurevis_simulated_lesion.py WORKDIR [--n-train 16] [--epochs 40]

1. ``grazbids.simulate`` writes a small cohort: the template brain with a small random
   deformation, no head pose (so scanner = MNI coordinates and registration can be
   skipped), patients with a bright (hyper-intense) lesion in the left frontal white
   matter, no shortcut confound.
2. Every scan is resampled onto the 2 mm template grid and intensity-normalised as the
   engine does; a small GrazPlusNet (4 channels) is trained on them (cross-entropy).
3. ``grazbids.featurevis.maximise`` visualises the patient class, from noise and from the
   template T1w, restricted to the template brain mask, and the result is compared with
   the simulator's template-space lesion mask: share of the positive mass (or of the
   positive change) inside the lesion against the lesion's share of the brain volume.

Needs the simulator (grazbids/simulate). Takes tens of CPU minutes at 2 mm. Prints one
JSON line per visualisation and writes the maps to WORKDIR/featurevis.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch
from nilearn.image import resample_to_img
from safetensors.torch import load_file, save_file

from grazbids.engine import Architecture, IntensityNormalisation, build_model
from grazbids.featurevis import AscentSettings, ClassLogit, Regularisers, maximise
from grazbids.simulate import SimulationConfig, simulate_cohort
from grazbids.templates import get_template

SPACE = "space-MNI152NLin2009aSym_res-2"


def _cohort(root: Path, n_train: int, n_test: int) -> Path:
    if not (root / "participants.tsv").is_file():
        config = SimulationConfig(n_train=n_train, n_test=n_test, seed=1, effect="lesion", effect_contrast="hyper",
                                  shortcut="none", max_rotation_deg=0.0, max_translation_mm=0.0, deformation_mm=1.0)
        simulate_cohort(config, root, nprocs=1)
    return root


def _load(root: Path, template, mask: np.ndarray):
    import pandas as pd

    table = pd.read_csv(root / "participants.tsv", sep="\t")
    tpl = nb.load(str(template.t1w))
    norm = IntensityNormalisation()
    images, labels, splits, lesion = [], [], [], np.zeros(mask.shape, bool)
    for row in table.itertuples():
        scan = nb.load(str(root / row.participant_id / "anat" / f"{row.participant_id}_T1w.nii.gz"))
        scan = nb.Nifti1Image(scan.get_fdata(dtype=np.float32), scan.affine)  # int16 on disk
        data = resample_to_img(scan, tpl, interpolation="continuous", force_resample=True,
                               copy_header=True).get_fdata(dtype=np.float32)
        images.append(norm.apply(data, mask) * mask)
        labels.append(int(row.diagnosis == "patient"))
        splits.append(row.split)
        effect = root / "derivatives" / "simulation" / row.participant_id / "anat" / \
            f"{row.participant_id}_{SPACE}_desc-effect_mask.nii.gz"
        lesion |= np.asanyarray(nb.load(str(effect)).dataobj) > 0
    return (torch.from_numpy(np.stack(images)[:, None]), torch.tensor(labels), np.array(splits), lesion & mask)


def _train(images, labels, train, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(Architecture(tuple(images.shape[2:]), n_classes=2, channels=4))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    index = np.flatnonzero(train)
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(index)
        losses = []
        for batch in np.array_split(order, max(1, len(order) // 4)):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimiser.step()
            model.project_biases_()
            losses.append(float(loss.detach()))
        print(json.dumps({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4)}), flush=True)
    return model


def _accuracy(model, images, labels, index) -> float:
    with torch.no_grad():
        return float((model(images[index]).argmax(1) == labels[index]).float().mean()) if len(index) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()

    template = get_template(resolution=2)
    mask = np.asanyarray(nb.load(str(template.brain_mask)).dataobj) > 0
    started = time.process_time()
    root = _cohort(args.workdir / "cohort", args.n_train, args.n_test)
    images, labels, splits, lesion = _load(root, template, mask)
    train, test = splits == "train", np.flatnonzero(splits == "test")
    weights = args.workdir / "model.safetensors"
    if weights.is_file():  # reuse the model of an earlier run
        model = build_model(Architecture(tuple(images.shape[2:]), n_classes=2, channels=4))
        model.load_state_dict(load_file(str(weights)))
    else:
        model = _train(images, labels, train, args.epochs)
        save_file(model.state_dict(), str(weights))
    summary = {"train_accuracy": _accuracy(model, images, labels, np.flatnonzero(train)),
               "test_accuracy": _accuracy(model, images, labels, test),
               "lesion_voxels": int(lesion.sum()), "lesion_share_of_brain": float(lesion.sum() / mask.sum()),
               "cpu_s_simulate_load_train": round(time.process_time() - started, 1)}
    print(json.dumps(summary), flush=True)

    tpl = nb.load(str(template.t1w))
    start_image = IntensityNormalisation().apply(np.asanyarray(tpl.dataobj, dtype=np.float32), mask)
    out = args.workdir / "featurevis"
    out.mkdir(parents=True, exist_ok=True)
    for name, start in (("noise", "noise"), ("template", "image")):
        probe = maximise(model, ClassLogit(1), AscentSettings(iterations=1, start=start),
                         mask=mask, start_image=start_image)
        l2 = probe.start_gradient  # a decay comparable to the mean gradient per voxel
        regs = Regularisers(l2=l2, tv=l2, jitter=1, fourier=True)
        t0 = time.process_time()
        result = maximise(model, ClassLogit(1), AscentSettings(iterations=args.iterations, lr=0.02, start=start,
                                                              regularisers=regs), mask=mask, start_image=start_image)
        change = (result.image - result.start_image).numpy() if start == "image" else result.image.numpy()
        positive = np.clip(change, 0, None) * mask
        peak = np.unravel_index(int(np.argmax(positive)), positive.shape)
        nb.save(nb.Nifti1Image(change.astype(np.float32), tpl.affine), str(out / f"patient_from-{name}.nii.gz"))
        print(json.dumps({
            "start": name, "l2": l2, "tv": l2, "objective": [result.start_value, result.objective_value],
            "positive_mass_in_lesion": float(positive[lesion].sum() / positive.sum()),
            "mean_in_lesion_over_mean_in_rest": float(positive[lesion].mean() / positive[mask & ~lesion].mean()),
            "peak_in_lesion": bool(lesion[peak]),
            "cpu_s_per_iteration": round((time.process_time() - t0) / args.iterations, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
