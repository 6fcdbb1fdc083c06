"""Shortcut evidence: do Graz+ and its outside-the-brain penalties resist shortcuts, measured
by decisions (flip rates, conflict cases) and not only by where relevance falls?

For every shortcut type of the simulator (marker, background, padding, ghost) and every
seed, a cohort is simulated directly on a common 4 mm grid (identity head pose, random
nonlinear anatomy, bias, noise, intensity scale; a hypointense lesion in every patient;
the confound in 90 % of training patients and 10 % of training controls, in half of each
test class): the images are aligned by construction, so no registration runs (the CLI path
is benchmarks/shortcut_benchmark.py). Every training variant is trained with the engine's
Trainer on the same data and seed, then tested on the held-out split:

  test balanced accuracy, accuracy on the conflict cases (confound contradicts the label),
  outside-brain flip rate (outside set to 0 / to the training mean image), the
  probability change, and the share of z+ relevance inside the brain and in the confound.

Mean and 95 % t-interval over seeds per variant and shortcut, the paired difference of every
variant minus plain with its interval, and a control: plain's conflict-case accuracy vs its
accuracy on the cases where the confound agrees with the label (a model using the shortcut
is right on the latter and wrong on the former).

    python benchmarks/shortcut_evidence.py --seeds 5 --epochs 15             # the documented run
    python benchmarks/shortcut_evidence.py --seeds 1 --epochs 2 --shortcuts marker  # a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grazbids.engine import (  # noqa: E402
    Architecture, IntensityNormalisation, Trainer, TrainingData, TrainSettings, balanced_accuracy,
)
from grazbids.explain import explain  # noqa: E402
from grazbids.explain.dependence import decision_dependence  # noqa: E402
from grazbids.simulate.anatomy import template_source  # noqa: E402
from grazbids.simulate.cohort import plan_cohort  # noqa: E402
from grazbids.simulate.config import SimulationConfig  # noqa: E402
from grazbids.simulate.deformation import Grid  # noqa: E402
from grazbids.simulate.participant import simulate_participant  # noqa: E402
from grazbids.templates import get_template  # noqa: E402

SHORTCUTS = ("marker", "background", "padding", "ghost")
VARIANTS = {  # name -> (mode, outside penalty)
    "plain": ("plain", "none"),
    "grazplus": ("grazplus", "none"),
    "grazplus+invariance": ("grazplus", "invariance"),
    "grazplus+gradient": ("grazplus", "gradient"),
    "grazplus+signed": ("grazplus", "signed"),
}


def resumable_results(args, depends_on: tuple[str, ...]) -> dict:
    """The results in ``args.out`` (an interrupted run resumes from them), refused when they
    were made with other values of the arguments ``depends_on`` (those a stored result
    depends on; the others choose which results to compute or show)."""
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    settings = {k: getattr(args, k) for k in depends_on}
    if results.setdefault("_settings", settings) != settings:
        raise SystemExit(f"{args.out} holds results made with {results['_settings']}; use another --out for {settings}")
    return results


def simulation_config(shortcut: str, seed: int, n_train: int, n_test: int, voxel: float, effect: str = "lesion",
                      effect_strength: float | None = None) -> SimulationConfig:
    """The cohort of the benchmarks: identity head pose, on a common grid."""
    return SimulationConfig(n_train=n_train, n_test=n_test, seed=seed, effect=effect, shortcut=shortcut,
                            effect_strength=effect_strength, voxel_size=voxel, max_rotation_deg=0.0,
                            max_translation_mm=0.0, background="noise" if shortcut == "padding" else "zero")


def simulate(shortcut: str, seed: int, n_train: int, n_test: int, voxel: float, effect: str = "lesion",
             effect_strength: float | None = None) -> dict:
    """Images, brain/shortcut/effect masks, labels, confound flags and splits on one grid."""
    config = simulation_config(shortcut, seed, n_train, n_test, voxel, effect, effect_strength)
    config.validate()
    template = get_template(resolution=2)
    template_img = nb.load(template.brain_mask)
    template_grid = Grid(template_img.shape, template_img.affine)
    template_brain = np.asarray(template_img.dataobj) > 0
    grid = Grid.centred(config.fov_mm, voxel)
    source = template_source(template, voxel)
    norm = IntensityNormalisation()
    out = {k: [] for k in ("image", "brain", "shortcut", "effect", "label", "confound", "split")}
    for plan in plan_cohort(config, ["template"]):
        scan = simulate_participant(plan, source, config, grid, template_grid, template_brain)
        brain = scan.brain.astype(np.float32)
        out["image"].append(norm.apply(scan.t1w, brain))
        out["brain"].append(brain)
        out["shortcut"].append(scan.shortcut_native.astype(np.float32))
        out["effect"].append(scan.effect_native)
        out["label"].append(int(plan.diagnosis == "patient"))
        out["confound"].append(plan.shortcut)
        out["split"].append(plan.split)
    return {k: np.stack(v) if k in ("image", "brain", "shortcut", "effect") else np.asarray(v) for k, v in out.items()}


def evaluate(model, cohort: dict, test: np.ndarray, train: np.ndarray, mode: str) -> dict:
    x = torch.from_numpy(cohort["image"][test][:, None])
    brain = torch.from_numpy(cohort["brain"][test][:, None])
    y, confound = cohort["label"][test], cohort["confound"][test]
    prepare = (lambda images: images * brain) if mode == "masked" else None
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(prepare(x[i:i + 4]) if prepare else x[i:i + 4]) for i in range(0, len(x), 4)])
    predicted = logits.argmax(1).numpy()
    conflict = confound != (y == 1)  # confound on a control or missing on a patient
    mean_image = torch.from_numpy(cohort["image"][train].mean(0))[None, None]
    zero = decision_dependence(model, x, 1 - brain, 0.0, prepare=prepare)
    mean = decision_dependence(model, x, 1 - brain, mean_image, prepare=prepare)
    relevance = explain(model, x, "zplus", target="softmax")[:, 0].numpy()
    total = np.maximum(relevance.sum(axis=(1, 2, 3)), 1e-12)
    shortcut = cohort["shortcut"][test]
    with_shortcut = shortcut.reshape(len(test), -1).any(1)
    return {
        "test_balanced_accuracy": balanced_accuracy(y, predicted, 2),
        "conflict_accuracy": float(np.mean(predicted[conflict] == y[conflict])),
        "agreeing_accuracy": float(np.mean(predicted[~conflict] == y[~conflict])),
        "flip_outside_zero": float(zero.flipped.mean()),
        "flip_outside_mean": float(mean.flipped.mean()),
        "prob_change_outside_zero": float(zero.change.mean()),
        "relevance_in_brain": float(np.mean((relevance * cohort["brain"][test]).sum(axis=(1, 2, 3)) / total)),
        "relevance_in_shortcut": float(np.mean(((relevance * shortcut).sum(axis=(1, 2, 3)) / total)[with_shortcut]))
        if with_shortcut.any() else float("nan"),
    }


def interval(values) -> tuple[float, float, float]:
    """Mean and 95 % t-interval (NaN half-width for one value)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def fmt(values) -> str:
    mean, low, high = interval(values)
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) else f"{mean:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shortcuts", nargs="+", choices=SHORTCUTS + ("none",), default=list(SHORTCUTS),
                        help="none: the lesion alone (a control: can the effect be learned from this cohort?)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train seeds first-seed .. seeds-1 only (split a run over processes with their own --out; "
                             "the report covers every seed < --seeds found in --out)")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--voxel-size", type=float, default=4.0)
    parser.add_argument("--effect-strength", type=float, default=None,
                        help="relative intensity change of the lesion (default: the simulator's, 0.5)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--penalty-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/shortcut_evidence.json"))
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="fold these results files (other processes' --out, same settings) into --out first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = resumable_results(args, ("n_train", "n_test", "voxel_size", "effect_strength", "epochs",
                                        "learning_rate", "penalty_weight"))
    for path in args.merge:
        other = json.loads(path.read_text())
        if other.get("_settings") != results["_settings"]:
            raise SystemExit(f"{path} holds results made with {other.get('_settings')}, not {results['_settings']}")
        results.update(other)
    if args.merge:
        args.out.write_text(json.dumps(results, indent=1))
    started = time.perf_counter()
    for shortcut in args.shortcuts:
        for seed in range(args.first_seed, args.seeds):
            cohort = None
            for name in args.variants:
                key = f"{shortcut}/{seed}/{name}"
                if key in results:
                    continue
                if cohort is None:
                    cohort = simulate(shortcut, seed, args.n_train, args.n_test, args.voxel_size,
                                      effect_strength=args.effect_strength)
                    train = np.flatnonzero(cohort["split"] == "train")
                    test = np.flatnonzero(cohort["split"] == "test")
                    data = TrainingData(torch.from_numpy(cohort["image"][:, None]), torch.from_numpy(cohort["brain"][:, None]),
                                        torch.from_numpy(cohort["label"]).long(), 2)
                mode, penalty = VARIANTS[name]
                settings = TrainSettings(mode=mode, epochs=args.epochs, batch_size=2, accumulation_steps=1,
                                         learning_rate=args.learning_rate, seed=seed, device="cpu", progress=False,
                                         outside_penalty=penalty, outside_penalty_weight=args.penalty_weight)
                t0 = time.perf_counter()
                arch = Architecture(tuple(cohort["image"].shape[1:]), n_classes=2)
                fit = Trainer(arch, settings, args.out.with_suffix("") / key).fit(data, train)  # checkpoints: resumable
                row = evaluate(fit.model, cohort, test, train, mode)
                row.update(train_seconds=round(time.perf_counter() - t0, 1), collapsed_epoch=fit.collapsed_epoch,
                           train_balanced_accuracy=float(fit.history[-1]["train_balanced_accuracy"]))
                results[key] = row
                args.out.write_text(json.dumps(results, indent=1))
                print(f"{key}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items()), flush=True)
    report(results, args)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


def report(results: dict, args) -> None:
    columns = ("test_balanced_accuracy", "conflict_accuracy", "flip_outside_zero", "flip_outside_mean",
               "relevance_in_brain", "relevance_in_shortcut")
    summary = {}
    for shortcut in args.shortcuts:
        print(f"\n### shortcut: {shortcut} (mean [95 % t-interval] over the seeds that finished, n)\n")
        print("| variant | n | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 2) + "|")
        for name in args.variants:
            rows = [results[f"{shortcut}/{s}/{name}"] for s in range(args.seeds) if f"{shortcut}/{s}/{name}" in results]
            if not rows:
                continue
            summary[f"{shortcut}/{name}"] = {c: interval([r[c] for r in rows]) for c in columns}
            print(f"| {name} | {len(rows)} | " + " | ".join(fmt([r[c] for r in rows]) for c in columns) + " |")
        plain = [results.get(f"{shortcut}/{s}/plain") for s in range(args.seeds)]
        for name in args.variants:
            if name == "plain":
                continue
            pairs = [(results.get(f"{shortcut}/{s}/{name}"), p) for s, p in enumerate(plain)]
            pairs = [(a, b) for a, b in pairs if a and b]
            if pairs:
                print(f"\n{name} - plain (paired): conflict accuracy {fmt([a['conflict_accuracy'] - b['conflict_accuracy'] for a, b in pairs])}, "
                      f"test BA {fmt([a['test_balanced_accuracy'] - b['test_balanced_accuracy'] for a, b in pairs])}, "
                      f"outside flip (zero) {fmt([a['flip_outside_zero'] - b['flip_outside_zero'] for a, b in pairs])}")
        control = [p for p in plain if p]
        if control:
            print(f"\ncontrol, plain: accuracy where the confound agrees with the label "
                  f"{fmt([p['agreeing_accuracy'] for p in control])} vs conflict cases "
                  f"{fmt([p['conflict_accuracy'] for p in control])}")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "settings": vars(args), "summary": summary}, default=str))


if __name__ == "__main__":
    main()
