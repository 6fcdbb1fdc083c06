"""Counterfactual simulator against ground truth, in process on a 4 mm simulation grid.

The same question as benchmarks/counterfactual_ground_truth.py (does the "inject" warp of
correctly classified controls reproduce the true atrophy?) without registration: the
cohort is simulated directly on a common grid as in benchmarks/shortcut_evidence.py
(identity head pose, random nonlinear anatomy, bias, noise; atrophy in every patient, no
shortcut), so the CPU budget goes to training. The true log volume change is that of the
simulator's atrophy effect at the grid's points (``AtrophyEffect.log_jacobian``; the
individual anatomy warps are small and average out in the group mean).

Reported: classifier test accuracy, the simulator's last epoch (hinge, displacement),
the flip fraction of correctly classified test images, the Pearson r inside the brain
between the group-mean "inject" log-Jacobian of correctly classified controls and the
truth, and the folded fraction.

    python benchmarks/counterfactual_grid.py --sim-epochs 20 [--smoothness-weight 1] [--cycle-weight 1]
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

from grazbids.counterfactual import SimulatorArchitecture, SimulatorSettings, SimulatorTrainer  # noqa: E402
from grazbids.counterfactual.apply import counterfactuals  # noqa: E402
from grazbids.engine import Architecture, Trainer, TrainingData, TrainSettings  # noqa: E402
from grazbids.simulate.deformation import Grid  # noqa: E402
from grazbids.simulate.effects import AtrophyEffect  # noqa: E402
from grazbids.simulate.regions import REGIONS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shortcut_evidence import simulate, simulation_config  # noqa: E402


def true_log_volume_change(config) -> np.ndarray:
    """log(volume in the patient / healthy) of the atrophy effect at the grid's points."""
    grid = Grid.centred(config.fov_mm, config.voxel_size)
    ijk = np.indices(grid.shape).reshape(3, -1)
    points = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]
    effect = AtrophyEffect.from_regions([REGIONS[r] for r in config.regions], config.strength)
    return -effect.log_jacobian(points).reshape(grid.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--voxel-size", type=float, default=4.0)
    p.add_argument("--effect-strength", type=float, default=None)
    p.add_argument("--epochs", type=int, default=12, help="classifier epochs")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="classifier learning rate")
    p.add_argument("--sim-epochs", type=int, default=20)
    p.add_argument("--sim-learning-rate", type=float, default=1e-3)
    p.add_argument("--margin", type=float, default=2.0)
    p.add_argument("--smoothness-weight", type=float, default=1.0)
    p.add_argument("--cycle-weight", type=float, default=1.0)
    p.add_argument("--diffeomorphic", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/cf_grid"))
    args = p.parse_args()
    torch.manual_seed(args.seed)

    cohort_args = ("none", args.seed, args.n_train, args.n_test, args.voxel_size, "atrophy", args.effect_strength)
    cohort = simulate(*cohort_args)
    truth = true_log_volume_change(simulation_config(*cohort_args))
    brains = cohort["brain"]
    x, m = torch.from_numpy(cohort["image"][:, None]), torch.from_numpy(brains[:, None])
    y = torch.from_numpy(cohort["label"]).long()
    train, test = np.flatnonzero(cohort["split"] == "train"), np.flatnonzero(cohort["split"] == "test")
    grid = tuple(x.shape[2:])
    started = time.perf_counter()
    settings = TrainSettings(mode="plain", epochs=args.epochs, batch_size=2, accumulation_steps=1,
                             learning_rate=args.learning_rate, seed=args.seed, device="cpu", progress=False)
    classifier = Trainer(Architecture(grid), settings, args.work / "classifier").fit(
        TrainingData(x, m, y, 2), train).model.eval()
    with torch.no_grad():
        predicted = classifier(x).argmax(1)
    accuracy = float((predicted[test] == y[test]).float().mean())
    print(f"grid {grid}; classifier test accuracy {accuracy:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    started = time.perf_counter()
    arch = SimulatorArchitecture(grid, field_downsample=1, diffeomorphic=args.diffeomorphic)
    sim_settings = SimulatorSettings(epochs=args.sim_epochs, batch_size=2, learning_rate=args.sim_learning_rate,
                                     margin=args.margin, smoothness_weight=args.smoothness_weight,
                                     cycle_weight=args.cycle_weight, device="cpu", progress=False)
    tag = f"s{args.smoothness_weight:g}_c{args.cycle_weight:g}_lr{args.sim_learning_rate:g}" + \
        ("_diffeo" if args.diffeomorphic else "")
    fit = SimulatorTrainer(arch, sim_settings, args.work / f"simulator_{tag}").fit(
        classifier, x[train], m[train], y[train], 1, "grid")
    simulator = fit.simulator.eval()
    seconds_sim = time.perf_counter() - started
    for row in fit.history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    flips, folded, inject_controls = [], [], []
    for i in range(len(y)):
        correct = int(predicted[i]) == int(y[i])
        direction = "remove" if y[i] == 1 else "inject"
        with torch.no_grad():
            result = counterfactuals(classifier, simulator, x[i:i + 1], m[i:i + 1], 1, directions=(direction,))[direction]
        folded.append(result.folded_fraction)
        if correct and i in set(test.tolist()):
            flips.append(int(np.argmax(result.probabilities_after)) != int(y[i]))
        if correct and y[i] == 0:
            inject_controls.append(result.log_jacobian)
    brain = brains.mean(axis=0) > 0.5
    r = float("nan")  # no correctly classified control: nothing to compare
    if inject_controls:
        r = float(np.corrcoef(np.mean(inject_controls, axis=0)[brain], truth[brain])[0, 1])
    summary = {"classifier_test_accuracy": accuracy, "simulator_epochs": len(fit.history),
               "flip_fraction_test": float(np.mean(flips)) if flips else float("nan"), "n_test_correct": len(flips),
               "pearson_r_inject_controls": r, "n_controls": len(inject_controls),
               "folded_fraction_mean": float(np.mean(folded)), "simulator_last_epoch": fit.history[-1],
               "seconds_simulator": round(seconds_sim), "settings": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
