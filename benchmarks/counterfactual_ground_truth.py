"""Counterfactual simulator against ground truth: a `grazbids-simulate --effect atrophy`
cohort, whose true log-Jacobian is known, run end to end through the command line.

    python benchmarks/counterfactual_ground_truth.py --work /tmp/cf --epochs 10 --sim-epochs 20

Steps (each skipped when its output exists, so the script resumes):
  1. python -m grazbids.simulate WORK/sim --effect atrophy --shortcut none ...
  2. python -m grazbids WORK/sim WORK/out participant
  3. python -m grazbids WORK/sim WORK/out group --participant-label <train split> --mode plain ...
  4. python -m grazbids.counterfactual train BUNDLE WORK/sim WORK/out --participant-label <train split>
  5. python -m grazbids.counterfactual apply BUNDLE ... for every participant (WORK/cf/sub-*)
then the numbers: on held-out (test-split) participants the classifier gets right, the
fraction whose decision the warp flips; inside the template brain, the Pearson r between
the group-mean log-Jacobian of "inject" on controls and the true log volume change of the
simulated atrophy; the voxel ROC-AUC of |log-Jacobian| ("remove" on each test patient)
against its true effect mask, beside the same ROC-AUC of the z+ LRP and Grad-CAM maps of
the same classifier (grazbids.explain, the code the participant level's --explain runs);
the fraction of folded voxels (det <= 0). The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np

SPACE = "space-MNI152NLin2009aSym_res-2"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def split(sim: Path) -> dict[str, dict[str, str]]:
    lines = (sim / "participants.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]
    return {r["participant_id"].removeprefix("sub-"): r for r in rows}


def true_log_volume_change(regions: list[str], strength: float, template) -> np.ndarray:
    """log(volume in the patient / volume in the healthy anatomy) on the template grid."""
    from grazbids.simulate.effects import AtrophyEffect
    from grazbids.simulate.regions import REGIONS

    img = nb.load(str(template.brain_mask))
    ijk = np.indices(img.shape).reshape(3, -1)
    points = (img.affine[:3, :3] @ ijk) + img.affine[:3, 3:4]
    effect = AtrophyEffect.from_regions([REGIONS[r] for r in regions], strength)
    # the simulator's map samples the healthy anatomy: its log det is -log(volume change)
    return -effect.log_jacobian(points).reshape(img.shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--effect-region", default="lateral-ventricles")
    p.add_argument("--effect-strength", type=float, default=0.4)
    p.add_argument("--mode", default="plain", choices=("plain", "masked", "grazplus"), help="classifier training mode")
    p.add_argument("--epochs", type=int, default=8, help="classifier epochs")
    p.add_argument("--learning-rate", default="3e-4")
    p.add_argument("--sim-epochs", type=int, default=20)
    p.add_argument("--sim-options", default="", help="further options of counterfactual train, e.g. '--diffeomorphic'")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--in-process-downsample", type=int, default=0, metavar="F",
                   help="after steps 1-2 (CLI), train classifier and simulator in this process on the template-space "
                        "images average-pooled by F (e.g. 2: 4 mm) instead of steps 3-5: for a CPU budget that cannot "
                        "train at 2 mm; the same library code, not the CLI")
    p.add_argument("--margin", type=float, default=2.0)
    p.add_argument("--smoothness-weight", type=float, default=1.0)
    p.add_argument("--diffeomorphic", action="store_true")
    args = p.parse_args(argv)
    py = sys.executable
    sim, out, cf = args.work / "sim", args.work / "out", args.work / "cf"
    bundle = out / "group" / f"mode-{args.mode}" / "model"
    if not (sim / "participants.tsv").exists():
        run([py, "-m", "grazbids.simulate", str(sim), "--n-train", str(args.n_train), "--n-test", str(args.n_test),
             "--effect", "atrophy", "--effect-region", args.effect_region, "--effect-strength",
             str(args.effect_strength), "--shortcut", "none", "--seed", str(args.seed), "--nprocs", "1"])
    rows = split(sim)
    train = sorted(k for k, r in rows.items() if r["split"] == "train")
    test = sorted(k for k, r in rows.items() if r["split"] == "test")
    common = ["--skip-bids-validation", "--nprocs", str(args.nprocs), "-w", str(args.work / "work")]
    if not all((out / f"sub-{k}").is_dir() for k in rows):
        run([py, "-m", "grazbids", str(sim), str(out), "participant", *common, "--omp-nthreads", "1"])
    if args.in_process_downsample:
        return lowres(args, sim, out, rows, train, test)
    if not (bundle / "model.safetensors").exists():
        run([py, "-m", "grazbids", str(sim), str(out), "group", *common, "--participant-label", *train,
             "--target-column", "diagnosis", "--mode", args.mode, "--cv-folds", "2", "--epochs", str(args.epochs),
             "--learning-rate", args.learning_rate, "--accumulation-steps", "1"])
    if not (bundle / "simulator" / "simulator_card.json").exists():
        run([py, "-m", "grazbids.counterfactual", "train", str(bundle), str(sim), str(out), "--participant-label",
             *train, "--epochs", str(args.sim_epochs), "--work-dir", str(args.work / "cf_work"),
             *args.sim_options.split()])
    for k in rows:
        t1w = out / f"sub-{k}" / "anat" / f"sub-{k}_{SPACE}_desc-preproc_T1w.nii.gz"
        mask = t1w.with_name(t1w.name.replace("desc-preproc_T1w", "desc-brain_mask"))
        if not (cf / f"sub-{k}" / f"sub-{k}_desc-remove_counterfactual.json").exists():
            run([py, "-m", "grazbids.counterfactual", "apply", str(bundle), str(t1w), str(mask), str(cf / f"sub-{k}"),
                 "--prefix", f"sub-{k}_"])
    return evaluate(args, sim, out, cf, bundle, rows, train, test)


def effect_detection_aucs(classifier, x, log_jacobian: np.ndarray, effect: np.ndarray, brain: np.ndarray) -> dict:
    """Voxel ROC-AUC, inside ``brain``, against one patient's true effect mask: of the
    counterfactual's |log-Jacobian| and of the z+ LRP and Grad-CAM maps (positive part) of
    the same classifier for the same input ``x`` (1, 1, D, H, W)."""
    from grazbids.evaluate.metrics import roc_auc
    from grazbids.explain import explain

    aucs = {"counterfactual": roc_auc(np.abs(log_jacobian), effect, brain)}
    for method, target in (("zplus", "softmax"), ("gradcam", "predicted")):
        heat = explain(classifier, x, method, target=target)[0, 0].detach().numpy()
        aucs[method] = roc_auc(np.clip(heat, 0, None), effect, brain)
    return aucs


def evaluate(args, sim, out, cf, bundle, rows, train, test) -> int:
    import torch

    from grazbids.engine import load_bundle
    from grazbids.engine.inference import input_tensor as model_input, load_input
    from grazbids.evaluate.metrics import roc_auc
    from grazbids.templates import get_template

    template = get_template("MNI152NLin2009aSym", 2)
    brain = np.asanyarray(nb.load(str(template.brain_mask)).dataobj) > 0.5
    truth = true_log_volume_change([args.effect_region], args.effect_strength, template)
    sim_card = json.loads((bundle / "simulator" / "simulator_card.json").read_text())
    model, card = load_bundle(bundle)

    def meta(k, direction):
        return json.loads((cf / f"sub-{k}" / f"sub-{k}_desc-{direction}_counterfactual.json").read_text())

    def logjac(k, direction):
        return nb.load(str(cf / f"sub-{k}" / f"sub-{k}_desc-{direction}_logjacobian.nii.gz")).get_fdata()

    # 1. decision flips on correctly classified held-out images
    flips, correct, folded = [], [], []
    for k in rows:
        direction = "remove" if rows[k]["diagnosis"] == "patient" else "inject"
        m = meta(k, direction)
        folded.append(m["FoldedFraction"])
        if k in test and m["PredictedBefore"] == rows[k]["diagnosis"]:
            correct.append(k)
            flips.append(m["PredictedAfter"] != m["PredictedBefore"])
    test_accuracy = np.mean([meta(k, "inject")["PredictedBefore"] == rows[k]["diagnosis"] for k in test])

    # 2. group-mean log-Jacobian of inject on correctly classified controls vs the truth
    def group_r(ids):
        ids = [k for k in ids if rows[k]["diagnosis"] == "control" and meta(k, "inject")["PredictedBefore"] == "control"]
        if not ids:
            return float("nan"), 0, None
        mean = np.mean([logjac(k, "inject") for k in ids], axis=0)
        return float(np.corrcoef(mean[brain], truth[brain])[0, 1]), len(ids), mean

    r_all, n_all, mean_all = group_r(list(rows))
    r_test, n_test_controls, _ = group_r(test)
    r_train, n_train_controls, _ = group_r(train)

    # 3. ROC-AUC against the effect mask on each test patient: |log-Jacobian| vs z+ vs Grad-CAM
    aucs = {"counterfactual": [], "zplus": [], "gradcam": []}
    for k in test:
        if rows[k]["diagnosis"] != "patient":
            continue
        effect = sim / "derivatives" / "simulation" / f"sub-{k}" / "anat" / f"sub-{k}_{SPACE}_desc-effect_mask.nii.gz"
        target = np.asanyarray(nb.load(str(effect)).dataobj) > 0.5
        t1w = out / f"sub-{k}" / "anat" / f"sub-{k}_{SPACE}_desc-preproc_T1w.nii.gz"
        data, mask, _ = load_input(t1w, t1w.with_name(t1w.name.replace("desc-preproc_T1w", "desc-brain_mask")), card)
        x = model_input(data, mask, card, torch.device("cpu"))
        for method, value in effect_detection_aucs(model, x, logjac(k, "remove"), target, brain).items():
            aucs[method].append(value)
    group_auc = roc_auc(np.abs(mean_all), np.abs(truth) > 0.05, brain) if mean_all is not None else float("nan")

    summary = {
        "classifier_test_accuracy": float(test_accuracy),
        "n_test_correct": len(correct),
        "flip_fraction_test": float(np.mean(flips)) if flips else float("nan"),
        "pearson_r_inject_controls_all": r_all, "n_controls_all": n_all,
        "pearson_r_inject_controls_test": r_test, "n_controls_test": n_test_controls,
        "pearson_r_inject_controls_train": r_train, "n_controls_train": n_train_controls,
        "roc_auc_test_patients": {m: [round(v, 3) for v in vals] for m, vals in aucs.items()},
        "roc_auc_mean": {m: float(np.mean(v)) if v else float("nan") for m, v in aucs.items()},
        "roc_auc_group_mean_inject_vs_true_mask": group_auc,
        "folded_fraction_mean": float(np.mean(folded)), "folded_fraction_max": float(np.max(folded)),
        "simulator": {k: sim_card["training"][k] for k in ("epochs", "margin", "smoothness_weight", "cycle_weight",
                                                            "learning_rate", "n_correctly_classified_used")},
        "diffeomorphic": sim_card["architecture"]["diffeomorphic"],
    }
    if mean_all is not None:
        affine = nb.load(str(template.brain_mask)).affine
        nb.save(nb.Nifti1Image(mean_all.astype(np.float32), affine), str(cf / "group_mean_inject_controls_logjacobian.nii.gz"))
        nb.save(nb.Nifti1Image((truth * brain).astype(np.float32), affine), str(cf / "true_log_volume_change.nii.gz"))
    print(json.dumps(summary))
    return 0


def _pool(volume: np.ndarray, factor: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    return F.avg_pool3d(torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None], factor,
                        ceil_mode=True)[0, 0].numpy()


def lowres(args, sim, out, rows, train, test) -> int:
    """Classifier (engine Trainer, mode plain) and simulator trained in process on pooled images."""
    import time

    import torch

    from grazbids.counterfactual import SimulatorArchitecture, SimulatorSettings, SimulatorTrainer
    from grazbids.counterfactual.apply import counterfactuals
    from grazbids.engine import Architecture, IntensityNormalisation, Trainer, TrainingData, TrainSettings
    from grazbids.templates import get_template

    f = args.in_process_downsample
    norm = IntensityNormalisation()
    template = get_template("MNI152NLin2009aSym", 2)
    brain = _pool(np.asanyarray(nb.load(str(template.brain_mask)).dataobj), f) > 0.5
    truth = _pool(true_log_volume_change([args.effect_region], args.effect_strength, template), f)
    ids = sorted(rows)
    images, masks, effects = [], [], []
    for k in ids:
        t1w = out / f"sub-{k}" / "anat" / f"sub-{k}_{SPACE}_desc-preproc_T1w.nii.gz"
        mask = np.asanyarray(nb.load(str(t1w).replace("desc-preproc_T1w", "desc-brain_mask")).dataobj) > 0.5
        data = norm.apply(np.asanyarray(nb.load(str(t1w)).dataobj), mask)
        images.append(_pool(data * mask, f))
        masks.append((_pool(mask, f) > 0.5).astype(np.float32))
        effect = sim / "derivatives" / "simulation" / f"sub-{k}" / "anat" / f"sub-{k}_{SPACE}_desc-effect_mask.nii.gz"
        effects.append(_pool(np.asanyarray(nb.load(str(effect)).dataobj) > 0.5, f) > 0.5)
    x = torch.from_numpy(np.stack(images)[:, None])
    m = torch.from_numpy(np.stack(masks)[:, None])
    y = torch.tensor([int(rows[k]["diagnosis"] == "patient") for k in ids])
    itrain = np.array([i for i, k in enumerate(ids) if k in train])
    itest = np.array([i for i, k in enumerate(ids) if k in test])
    grid = tuple(x.shape[2:])
    print(f"grid {grid} ({2 * f} mm), {len(itrain)} train / {len(itest)} test", flush=True)

    start = time.time()
    ts = TrainSettings(mode="plain", epochs=args.epochs, batch_size=2, accumulation_steps=1,
                       learning_rate=float(args.learning_rate), device="cpu", progress=False)
    fit = Trainer(Architecture(grid), ts, args.work / "lowres_classifier").fit(TrainingData(x, m, y, 2), itrain)
    classifier = fit.model.eval()
    t_classifier = time.time() - start
    with torch.no_grad():
        predicted = classifier(x).argmax(1)
    print(f"classifier: train accuracy {float((predicted[itrain] == y[itrain]).float().mean()):.3f}, test accuracy "
          f"{float((predicted[itest] == y[itest]).float().mean()):.3f} ({t_classifier:.0f} s)", flush=True)

    start = time.time()
    arch = SimulatorArchitecture(grid, field_downsample=1, diffeomorphic=args.diffeomorphic)
    ss = SimulatorSettings(epochs=args.sim_epochs, batch_size=2, margin=args.margin,
                           smoothness_weight=args.smoothness_weight, device="cpu", progress=False)
    sfit = SimulatorTrainer(arch, ss, args.work / "lowres_simulator").fit(classifier, x[itrain], m[itrain], y[itrain],
                                                                          1, "lowres")
    t_sim = time.time() - start
    simulator = sfit.simulator.eval()
    results = {}
    for i, k in enumerate(ids):
        needed = ("remove",) if y[i] == 1 else ("inject",)  # the direction each image is evaluated in
        results[k] = counterfactuals(classifier, simulator, x[i:i + 1], m[i:i + 1], 1, directions=needed)
    flips, folded = [], []
    for i, k in enumerate(ids):
        direction = "remove" if y[i] == 1 else "inject"
        r = results[k][direction]
        folded.append(r.folded_fraction)
        if k in test and int(predicted[i]) == int(y[i]):
            flips.append(int(np.argmax(r.probabilities_after)) != int(y[i]))

    def group_r(which):
        chosen = [i for i in which if y[i] == 0 and predicted[i] == 0]
        mean = np.mean([results[ids[i]]["inject"].log_jacobian for i in chosen], axis=0)
        return float(np.corrcoef(mean[brain], truth[brain])[0, 1]), len(chosen), mean

    r_all, n_all, mean_all = group_r(range(len(ids)))
    r_test, n_t, _ = group_r(itest)
    r_train, n_tr, _ = group_r(itrain)
    aucs = {"counterfactual": [], "zplus": [], "gradcam": []}
    for i in itest:
        if y[i] != 1:
            continue
        detected = effect_detection_aucs(classifier, x[i:i + 1], results[ids[i]]["remove"].log_jacobian, effects[i], brain)
        for method, value in detected.items():
            aucs[method].append(value)
    summary = {
        "resolution_mm": 2 * f, "grid": list(grid), "classifier_epochs": args.epochs, "simulator_epochs": len(sfit.history),
        "classifier_test_accuracy": float((predicted[itest] == y[itest]).float().mean()),
        "n_test_correct": len(flips), "flip_fraction_test": float(np.mean(flips)) if flips else float("nan"),
        "pearson_r_inject_controls_all": r_all, "n_controls_all": n_all,
        "pearson_r_inject_controls_test": r_test, "n_controls_test": n_t,
        "pearson_r_inject_controls_train": r_train, "n_controls_train": n_tr,
        "roc_auc_test_patients": {k: [round(v, 3) for v in vals] for k, vals in aucs.items()},
        "roc_auc_mean": {k: float(np.mean(v)) if v else float("nan") for k, v in aucs.items()},
        "folded_fraction_mean": float(np.mean(folded)), "folded_fraction_max": float(np.max(folded)),
        "diffeomorphic": args.diffeomorphic, "margin": args.margin, "smoothness_weight": args.smoothness_weight,
        "simulator_last_epoch": sfit.history[-1], "collapsed_epoch": sfit.collapsed_epoch,
        "seconds_classifier": round(t_classifier), "seconds_simulator": round(t_sim),
    }
    affine = nb.load(str(template.brain_mask)).affine @ np.diag([f, f, f, 1])
    tag = "diffeo" if args.diffeomorphic else "plain"
    nb.save(nb.Nifti1Image((mean_all * brain).astype(np.float32), affine),
            str(args.work / f"lowres_{tag}_group_mean_inject_logjacobian.nii.gz"))
    nb.save(nb.Nifti1Image((truth * brain).astype(np.float32), affine), str(args.work / "lowres_true_log_volume_change.nii.gz"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
