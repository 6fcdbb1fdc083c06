"""Counterfactual simulator against ground truth, in process on a 4 mm simulation grid.

The same question as benchmarks/counterfactual_ground_truth.py (does the "inject" warp of
correctly classified controls reproduce the true atrophy?) without registration: the
cohort is simulated directly on a common grid as in benchmarks/shortcut_evidence.py
(identity head pose, random nonlinear anatomy, bias, noise; atrophy in every patient, no
shortcut), so the CPU budget goes to training. The true log volume change is that of the
simulator's atrophy effect at the MNI coordinates of the grid's points
(``AtrophyEffect.log_jacobian``; the individual anatomy warps are small and average out
in the group mean).

Reported: classifier test accuracy, the simulator's last epoch (hinge, displacement),
the flip fraction of correctly classified test images, the Pearson r inside the brain
between the group-mean "inject" log-Jacobian of correctly classified controls and the
truth (all controls, and test controls only), the voxel ROC-AUC of |log-Jacobian|
("remove" on each correctly classified test patient) against its true effect mask beside
the ROC-AUC of the z+ LRP and Grad-CAM maps of the same classifier, and the folded
fraction. With ``--figure`` a PNG of the group-mean map beside the truth.

The defaults are the recipe measured to learn this cohort (session 6: 200 training
participants, Graz+ architecture in mode plain, lr 1e-4, 30 epochs: test accuracy 1.0;
with 40 participants no setting learned it). The classifier and simulator checkpoints
live under ``--work``: a rerun resumes, and another simulator setting reuses the
classifier.

    python benchmarks/counterfactual_grid.py --sim-epochs 16 --margin 12 [--smoothness l1|l2] [--cycle-weight 1] \
        [--displacement-weight 10] [--centre-field] [--seed S --work DIR] [--objective-check] [--figure F.png]

The summary also gives the mean inject field inside the brain (a shift of the whole brain),
the flip fraction per direction and the classifiers' median log-odds before the warp.
``--centre-field`` measures the command line's default (session 9): the last
``--second-phase-epochs`` (a quarter) continue with the field centred in the brain.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grazbids.counterfactual import ConditionalUNet, SimulatorArchitecture, SimulatorSettings, SimulatorTrainer  # noqa: E402
from grazbids.counterfactual.apply import counterfactuals  # noqa: E402
from grazbids.counterfactual.losses import disease_log_odds, displacement, logit_shift_hinge, smoothness  # noqa: E402
from grazbids.counterfactual.training import simulator_objective  # noqa: E402
from grazbids.counterfactual.warp import log_volume_change, warp  # noqa: E402
from grazbids.engine import Architecture, Trainer, TrainingData, TrainSettings  # noqa: E402
from grazbids.simulate.anatomy import HEAD_REFERENCE_MNI  # noqa: E402
from grazbids.simulate.deformation import Grid, Pose, apply_affine  # noqa: E402
from grazbids.simulate.effects import AtrophyEffect  # noqa: E402
from grazbids.simulate.regions import REGIONS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from counterfactual_ground_truth import effect_detection_aucs  # noqa: E402
from shortcut_evidence import simulate, simulation_config  # noqa: E402


def grid_and_mni_points(config) -> tuple[Grid, np.ndarray]:
    """The cohort's grid and the MNI mm of its voxel centres: the simulator's chain
    (scanner -> MNI through the identity head pose about HEAD_REFERENCE_MNI, template
    source), without the individual anatomy warps (small; they average out in a group)."""
    grid = Grid.centred(config.fov_mm, config.voxel_size)
    scanner_from_mni = Pose((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)).matrix(np.asarray(HEAD_REFERENCE_MNI))
    return grid, apply_affine(np.linalg.inv(scanner_from_mni), grid.points)


def atrophy_effect(config) -> AtrophyEffect:
    return AtrophyEffect.from_regions([REGIONS[r] for r in config.regions], config.strength)


def true_log_volume_change(config) -> np.ndarray:
    """log(volume in the patient / healthy) of the atrophy effect at the grid's points."""
    grid, mni = grid_and_mni_points(config)
    return -atrophy_effect(config).log_jacobian(mni).reshape(grid.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--voxel-size", type=float, default=4.0)
    p.add_argument("--effect-strength", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=30, help="classifier epochs")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="classifier learning rate")
    p.add_argument("--sim-epochs", type=int, default=16)
    p.add_argument("--sim-learning-rate", type=float, default=1e-3)
    p.add_argument("--margin", type=float, default=SimulatorSettings.margin)
    p.add_argument("--smoothness", choices=("l1", "l2"), default="l2", help="field regulariser (l1: the paper's)")
    p.add_argument("--smoothness-weight", type=float, default=None, help="default: the simulator's for the penalty")
    p.add_argument("--cycle-weight", type=float, default=1.0)
    p.add_argument("--displacement-weight", type=float, default=SimulatorSettings.displacement_weight,
                   help="x mean squared displacement (voxels^2) in the second phase (default %(default)s)")
    p.add_argument("--second-phase-epochs", type=int, default=None,
                   help="with --centre-field or --displacement-weight: default a quarter of --sim-epochs")
    p.add_argument("--diffeomorphic", action="store_true")
    p.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="start the simulator from the weights of another run's checkpoint (a folder under --work)")
    p.add_argument("--augment-copies", type=int, default=0, metavar="N",
                   help="train the classifier on N randomly warped copies of each training image besides it")
    p.add_argument("--augment-voxels", type=float, default=1.5, help="their displacement scale (voxels, s.d.)")
    p.add_argument("--hold-outline", type=int, default=0, metavar="VOXELS",
                   help="the field fades to 0 within VOXELS inside the brain's outline (0: off)")
    p.add_argument("--centre-field", action="store_true",
                   help="subtract the field's mean inside the brain in a second phase (no shift of the whole brain)")
    p.add_argument("--work", type=Path, default=Path("/tmp/cf_grid"))
    p.add_argument("--figure", type=Path, default=None, help="PNG: group-mean inject log-Jacobian beside the truth")
    p.add_argument("--objective-check", action="store_true",
                   help="also score the true atrophy warp (scaled x1-3) on the simulator's own objective, beside the "
                        "simulator's warps, on the correctly classified test controls")
    p.add_argument("--direct", type=int, default=0, metavar="N",
                   help="instead of training the simulator, optimise the inject field of N correctly classified test "
                        "controls directly, one by one (the simulator's hinge and smoothness terms, no cycle; Adam "
                        "lr 0.01, 150 steps): what the objective itself prefers, without the U-Net; with "
                        "--init-from, starting from that simulator's fields")
    args = p.parse_args()
    torch.manual_seed(args.seed)

    cohort_args = ("none", args.seed, args.n_train, args.n_test, args.voxel_size, "atrophy", args.effect_strength)
    cohort = simulate(*cohort_args)
    truth = true_log_volume_change(simulation_config(*cohort_args))
    check_truth_placement(truth, cohort)
    brains = cohort["brain"]
    x, m = torch.from_numpy(cohort["image"][:, None]), torch.from_numpy(brains[:, None])
    y = torch.from_numpy(cohort["label"]).long()
    train, test = np.flatnonzero(cohort["split"] == "train"), np.flatnonzero(cohort["split"] == "test")
    grid = tuple(x.shape[2:])
    started = time.perf_counter()
    settings = TrainSettings(mode="plain", epochs=args.epochs, batch_size=2, accumulation_steps=1,
                             learning_rate=args.learning_rate, seed=args.seed, device="cpu", progress=False)
    x_fit, m_fit, y_fit, fit_index, name = x, m, y, train, "classifier"
    if args.augment_copies:  # randomly warped copies of the training images, same labels
        x_aug, m_aug = elastic_copies(x[train], m[train], args.augment_copies, args.augment_voxels, args.seed)
        x_fit, m_fit = torch.cat([x[train], x_aug]), torch.cat([m[train], m_aug])
        y_fit = torch.cat([y[train]] * (1 + args.augment_copies))
        fit_index = np.arange(len(y_fit))
        name = f"classifier_aug{args.augment_copies}_{args.augment_voxels:g}"
    classifier = Trainer(Architecture(grid), settings, args.work / name).fit(
        TrainingData(x_fit, m_fit, y_fit, 2), fit_index).model.eval()
    with torch.no_grad():
        predicted = classifier(x).argmax(1)
    accuracy = float((predicted[test] == y[test]).float().mean())
    print(f"grid {grid}; classifier test accuracy {accuracy:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    if args.direct:
        controls = [i for i in test if int(y[i]) == 0 and int(predicted[i]) == 0][:args.direct]
        settings = SimulatorSettings(margin=args.margin, smoothness_penalty=args.smoothness,
                                     smoothness_weight=args.smoothness_weight,
                                     displacement_weight=args.displacement_weight)
        start = None
        if args.init_from:  # refine the simulator's own inject fields instead of starting from 0
            simulator = ConditionalUNet(SimulatorArchitecture(grid, field_downsample=1)).eval()
            simulator.load_state_dict(simulator_weights(args.init_from / "checkpoint.safetensors"))
            with torch.no_grad():
                start = [simulator(x[i:i + 1], torch.ones(1), m[i:i + 1]) for i in controls]
        direct_optimisation(classifier, x[controls], truth, brains.mean(axis=0) > 0.5, settings, start)
        return

    started = time.perf_counter()
    arch = SimulatorArchitecture(grid, field_downsample=1, diffeomorphic=args.diffeomorphic,
                                 hold_outline_voxels=args.hold_outline, centre_field=args.centre_field)
    sim_settings = SimulatorSettings(epochs=args.sim_epochs, batch_size=2, learning_rate=args.sim_learning_rate,
                                     margin=args.margin, smoothness_penalty=args.smoothness,
                                     smoothness_weight=args.smoothness_weight,
                                     cycle_weight=args.cycle_weight, displacement_weight=args.displacement_weight,
                                     second_phase_epochs=args.second_phase_epochs, device="cpu", progress=False)
    tag = "_".join(part for part in (
        f"aug{args.augment_copies}_{args.augment_voxels:g}" if args.augment_copies else "",
        f"m{args.margin:g}_s{sim_settings.smoothness_weight:g}_c{args.cycle_weight:g}_lr{args.sim_learning_rate:g}",
        f"d{args.displacement_weight:g}" if args.displacement_weight else "",
        f"de{args.second_phase_epochs}" if args.second_phase_epochs is not None else "",
        "l2" if args.smoothness == "l2" else "", "diffeo" if args.diffeomorphic else "",
        f"hold{args.hold_outline}" if args.hold_outline else "", "centre" if args.centre_field else "",
        f"from-{args.init_from.name}" if args.init_from else "") if part)
    initial = simulator_weights(args.init_from / "checkpoint.safetensors") if args.init_from else None
    fit = SimulatorTrainer(arch, sim_settings, args.work / f"simulator_{tag}").fit(
        classifier, x[train], m[train], y[train], 1, "grid", initial_state=initial)
    simulator = fit.simulator.eval()
    seconds_sim = time.perf_counter() - started
    for row in fit.history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    test_set = set(test.tolist())
    flips, folded, inject_controls, inject_test_controls, shifts = {"inject": [], "remove": []}, [], [], [], []
    log_odds = {"inject": [], "remove": []}
    brain = brains.mean(axis=0) > 0.5
    aucs = {"counterfactual": [], "zplus": [], "gradcam": []}
    for i in range(len(y)):
        correct = int(predicted[i]) == int(y[i])
        direction = "remove" if y[i] == 1 else "inject"
        with torch.no_grad():
            result = counterfactuals(classifier, simulator, x[i:i + 1], m[i:i + 1], 1, directions=(direction,))[direction]
        folded.append(result.folded_fraction)
        if correct and i in test_set:
            flips[direction].append(int(np.argmax(result.probabilities_after)) != int(y[i]))
            log_odds[direction].append(result.log_odds_before)
        if correct and y[i] == 0:
            inject_controls.append(result.log_jacobian)
            shifts.append(result.field[:, brain].mean(axis=1))  # the field's mean in the brain: a shift
            if i in test_set:
                inject_test_controls.append(result.log_jacobian)
        if correct and y[i] == 1 and i in test_set:  # detection of the patient's own effect
            detected = effect_detection_aucs(classifier, x[i:i + 1], result.log_jacobian, cohort["effect"][i], brain)
            for method, value in detected.items():
                aucs[method].append(value)

    def pearson(maps):  # nan without a correctly classified control
        return float(np.corrcoef(np.mean(maps, axis=0)[brain], truth[brain])[0, 1]) if maps else float("nan")

    summary = {"classifier_test_accuracy": accuracy, "simulator_epochs": len(fit.history),
               "flip_fraction_test": {k: float(np.mean(v)) if v else float("nan") for k, v in flips.items()},
               "n_test_correct": {k: len(v) for k, v in flips.items()},
               "median_log_odds_before": {k: float(np.median(v)) if v else float("nan") for k, v in log_odds.items()},
               "pearson_r_inject_controls": pearson(inject_controls), "n_controls": len(inject_controls),
               "pearson_r_inject_test_controls": pearson(inject_test_controls),
               "n_test_controls": len(inject_test_controls),
               "roc_auc_mean": {k: float(np.mean(v)) if v else float("nan") for k, v in aucs.items()},
               "roc_auc_test_patients": {k: [round(v, 3) for v in vals] for k, vals in aucs.items()},
               "mean_shift_in_brain_voxels": np.mean(shifts, axis=0).round(3).tolist() if shifts else None,
               "folded_fraction_mean": float(np.mean(folded)), "folded_fraction_max": float(np.max(folded)),
               "simulator_last_epoch": fit.history[-1], "seconds_simulator": round(seconds_sim),
               "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.objective_check:
        controls = [i for i in test if int(y[i]) == 0 and int(predicted[i]) == 0]
        u_true = true_inject_field(simulation_config(*cohort_args))
        summary["objective_check"] = objective_check(classifier, simulator, x[controls], m[controls], u_true,
                                                     sim_settings)
    if args.figure and inject_controls:
        save_figure(args.figure, np.mean(inject_controls, axis=0), truth, brain, summary)
    print(json.dumps(summary), flush=True)


def simulator_weights(checkpoint: Path) -> dict:
    """The simulator's weights in a training checkpoint (its tensors ``model.<name>``)."""
    from safetensors.torch import load_file
    return {k[len("model."):]: v for k, v in load_file(checkpoint).items() if k.startswith("model.")}


def check_truth_placement(truth: np.ndarray, cohort: dict) -> None:
    """Guard: the true map must sit where the simulator put the effect (an earlier version
    evaluated it at scanner instead of MNI coordinates, 18-22 mm off)."""
    simulated = cohort["effect"][cohort["label"] == 1].mean(axis=0) > 0.5
    support = np.abs(truth) > 0.05
    dice = 2.0 * (simulated & support).sum() / max(simulated.sum() + support.sum(), 1)
    print(f"truth placement: Dice of the true |log volume change| > 0.05 vs the simulated effect masks {dice:.2f}")
    if dice < 0.5:
        raise SystemExit("the true log volume change does not lie where the simulator put the effect")


def true_inject_field(config) -> torch.Tensor:
    """(1, 3, D, H, W) voxel displacement that turns a control into a patient of this cohort:
    a patient's image at p shows the healthy anatomy at the effect's backward map of p."""
    grid, mni = grid_and_mni_points(config)
    healthy = atrophy_effect(config).backward(mni) - mni + grid.points  # the same shift in scanner mm
    u = grid.to_index(healthy) - np.indices(grid.shape, dtype=float).reshape(3, -1)
    return torch.from_numpy(u.reshape(1, 3, *grid.shape).astype(np.float32))


def inverse_field(u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """v with warp(warp(x, u), v) = x: the fixed point of v(p) = -u(p + v(p))."""
    v = -u
    for _ in range(iterations):
        v = -warp(u, v, padding_mode="border")
    return v


@torch.no_grad()
def objective_check(classifier, simulator, x, m, u_true, settings, scales=(1.0, 1.5, 2.0, 3.0)) -> dict:
    """Is the true warp a better optimum of the simulator's objective than the one it found?
    Per warp: the mean shift of the disease log-odds, hinge (at the training margin),
    smoothness and cycle terms and their weighted sum (the training loss, inject direction)."""
    before = disease_log_odds(classifier(x), 1)
    c = torch.ones(len(x))

    def terms(u, back):
        after = disease_log_odds(classifier(warp(x, u)), 1)
        objective = simulator_objective(settings, x, m, c, before, after, u, back)
        return {"log_odds_shift": float((after - before).mean()), "flips": float(((after > 0) != (before > 0)).float().mean()),
                **{k: float(v.mean()) for k, v in objective.items()},
                "mean_displacement_voxels": float(u.norm(dim=1).mean())}

    rows = {}
    u_sim = torch.cat([simulator(x[i:i + 1], c[i:i + 1], m[i:i + 1]) for i in range(len(x))])
    back_sim = torch.cat([simulator(warp(x[i:i + 1], u_sim[i:i + 1]), -c[i:i + 1], m[i:i + 1]) for i in range(len(x))])
    rows["simulator"] = terms(u_sim, back_sim)
    for scale in scales:
        u = (scale * u_true).expand(len(x), -1, -1, -1, -1)
        rows[f"truth x{scale:g}"] = terms(u, inverse_field(u))
    print(f"\nobjective check, {len(x)} correctly classified test controls, inject, margin {settings.margin:g}:")
    print("| warp | log-odds shift | flips | hinge | smoothness | cycle | displacement | loss | mean displacement (voxels) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['log_odds_shift']:.2f} | {r['flips']:.2f} | {r['hinge']:.3f} | {r['smoothness']:.3g} | "
              f"{r['cycle']:.4f} | {r['displacement']:.4f} | {r['loss']:.3f} | {r['mean_displacement_voxels']:.3f} |", flush=True)
    return rows


def direct_optimisation(classifier, x, truth, brain, settings, start=None, steps: int = 150, lr: float = 0.01) -> None:
    """Per image, the field minimising hinge + weight x smoothness (inject) by Adam from 0;
    prints each image's log-odds shift and r with the truth, and the r of their mean."""
    for q in classifier.parameters():
        q.requires_grad_(False)
    maps = []
    for i in range(len(x)):
        xi = x[i:i + 1]
        with torch.no_grad():
            before = disease_log_odds(classifier(xi), 1)
        u = torch.zeros(1, 3, *xi.shape[2:]) if start is None else start[i].clone()
        if start is not None:
            print(f"control {i}: the simulator's field, r {np.corrcoef(log_volume_change(u)[0].numpy()[brain], truth[brain])[0, 1]:.3f}")
        u.requires_grad_(True)
        optimiser = torch.optim.Adam([u], lr=lr)
        for _ in range(steps):
            after = disease_log_odds(classifier(warp(xi, u)), 1)
            loss = logit_shift_hinge(before, after, torch.ones(1), settings.margin) + \
                settings.smoothness_weight * smoothness(u, settings.smoothness_penalty) + \
                settings.displacement_weight * displacement(u)
            optimiser.zero_grad()
            loss.sum().backward()
            optimiser.step()
        maps.append(log_volume_change(u.detach())[0].numpy())
        print(f"control {i}: log-odds shift {float(after.detach() - before):.2f}, mean displacement "
              f"{float(u.detach().norm(dim=1).mean()):.3f} voxels, mean field in the brain "
              f"{u.detach()[0][:, torch.from_numpy(brain)].mean(dim=1).numpy().round(3)}, r {np.corrcoef(maps[-1][brain], truth[brain])[0, 1]:.3f}",
              flush=True)
    r = np.corrcoef(np.mean(maps, axis=0)[brain], truth[brain])[0, 1]
    print(f"direct optimisation, {settings.smoothness_penalty} weight {settings.smoothness_weight:g}, margin "
          f"{settings.margin:g}: Pearson r of the mean of {len(maps)} maps with the truth {r:.3f}", flush=True)


def elastic_copies(x: torch.Tensor, m: torch.Tensor, copies: int, voxels: float, seed: int):
    """``copies`` warps of each image and mask by smooth random fields: Gaussian
    displacements (s.d. ``voxels``) on a grid 8x coarser, upsampled trilinearly."""
    g = torch.Generator().manual_seed(seed + 1)
    shape = x.shape[2:]
    coarse = [max(2, s // 8) for s in shape]
    images, masks = [], []
    for _ in range(copies):
        u = torch.randn(len(x), 3, *coarse, generator=g) * voxels
        u = torch.nn.functional.interpolate(u, size=shape, mode="trilinear", align_corners=True)
        images.append(warp(x, u))
        masks.append((warp(m, u) > 0.5).to(m.dtype))
    return torch.cat(images), torch.cat(masks)


def save_figure(path: Path, mean_map: np.ndarray, truth: np.ndarray, brain: np.ndarray, summary: dict) -> None:
    """Three orthogonal slices through the truth's extreme: group mean (top) vs truth (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = np.unravel_index(np.argmax(np.abs(truth) * brain), truth.shape)
    limit = float(np.percentile(np.abs(np.concatenate([mean_map[brain], truth[brain]])), 99.5)) or 1.0
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for row, (name, volume) in enumerate((("group-mean inject log-Jacobian, correct controls", mean_map),
                                          ("true log volume change", truth))):
        shown = np.where(brain, volume, np.nan)
        for col in range(3):
            cut = np.take(shown, centre[col], axis=col)
            axes[row, col].imshow(np.rot90(cut), cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[row, col].axis("off")
        axes[row, 0].set_title(name, loc="left", fontsize=9)
    fig.suptitle(f"Pearson r in the brain {summary['pearson_r_inject_controls']:.2f} "
                 f"({summary['n_controls']} controls); red = expansion, blue = shrinkage", fontsize=10)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
