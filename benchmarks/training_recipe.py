"""Training recipe on a CPU budget: which learning rate and warm-up make the Graz+ network
learn a simulated cohort within a fixed number of epochs?

Same cohorts and evaluation as benchmarks/shortcut_evidence.py (4 mm grid, 40 training
and 40 test participants, a hypointense lesion in every patient; ``--shortcut none`` by
default, so the lesion is the only signal and "learning" is unambiguous). For every
mode, learning rate, warm-up and seed, one model is trained with the engine's Trainer
(batch 2; no accumulation unless --accumulation-steps) and tested on the held-out split. Reported per setting: mean
and 95 % t-interval over seeds of the final training balanced accuracy and the test
balanced accuracy, how many runs sit near chance on the test set (balanced accuracy
< 0.6), how many died (the trainer's dead-network check) and the seconds per model.

    python benchmarks/training_recipe.py --modes plain grazplus --seeds 3 --epochs 12   # the documented run
    python benchmarks/training_recipe.py --modes plain --seeds 1 --epochs 1 --learning-rates 1e-3 --warmups 0  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shortcut_evidence import SHORTCUTS, evaluate, fmt, resumable_results, simulate  # noqa: E402

from grazbids.engine import Architecture, Trainer, TrainingData, TrainSettings  # noqa: E402

NEAR_CHANCE = 0.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shortcut", choices=("none", *SHORTCUTS), default="none")
    parser.add_argument("--modes", nargs="+", default=["plain", "grazplus"])
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--warmups", nargs="+", type=int, default=[0, 3], help="warm-up epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--accumulation-steps", type=int, default=1, help="batches per optimiser step (CLI default 4)")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--voxel-size", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/training_recipe.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = resumable_results(args, ("n_train", "n_test", "voxel_size"))  # the keys name the rest
    for seed in range(args.seeds):
        cohort = None
        for mode in args.modes:
            for lr in args.learning_rates:
                for warmup in args.warmups:
                    key = _key(args, seed, mode, lr, warmup)
                    if key in results:
                        continue
                    if cohort is None:
                        cohort = simulate(args.shortcut, seed, args.n_train, args.n_test, args.voxel_size)
                        train = np.flatnonzero(cohort["split"] == "train")
                        test = np.flatnonzero(cohort["split"] == "test")
                        data = TrainingData(torch.from_numpy(cohort["image"][:, None]),
                                            torch.from_numpy(cohort["brain"][:, None]),
                                            torch.from_numpy(cohort["label"]).long(), 2)
                    settings = TrainSettings(mode=mode, epochs=args.epochs, batch_size=2,
                                             accumulation_steps=args.accumulation_steps,
                                             learning_rate=lr, warmup_epochs=warmup, seed=seed, device="cpu",
                                             progress=False)
                    started = time.perf_counter()
                    arch = Architecture(tuple(cohort["image"].shape[1:]), n_classes=2)
                    fit = Trainer(arch, settings, args.out.with_suffix("") / key).fit(data, train)
                    row = evaluate(fit.model, cohort, test, train, mode)
                    row.update(seconds=round(time.perf_counter() - started, 1), collapsed_epoch=fit.collapsed_epoch,
                               train_balanced_accuracy=float(fit.history[-1]["train_balanced_accuracy"]))
                    results[key] = row
                    args.out.write_text(json.dumps(results, indent=1))
                    print(f"{key}: train BA {row['train_balanced_accuracy']:.3f}, test BA "
                          f"{row['test_balanced_accuracy']:.3f}, died {row['collapsed_epoch']}, {row['seconds']} s",
                          flush=True)
    report(results, args)


def _key(args, seed: int, mode: str, lr: float, warmup: int) -> str:
    # the first runs (12 epochs, no accumulation) keep their keys: their results file resumes
    budget = "" if (args.epochs, args.accumulation_steps) == (12, 1) else f"/e{args.epochs}a{args.accumulation_steps}"
    return f"{args.shortcut}/{seed}/{mode}/{lr:g}/{warmup}{budget}"


def report(results: dict, args) -> None:
    print(f"\nshortcut {args.shortcut}, {args.epochs} epochs, accumulation {args.accumulation_steps}, "
          "mean [95 % t-interval] over seeds\n")
    print("| mode | learning rate | warm-up epochs | n | final train BA | test BA | test BA < 0.6 | died | s per model |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for mode in args.modes:
        for lr in args.learning_rates:
            for warmup in args.warmups:
                rows = [results[k] for s in range(args.seeds) if (k := _key(args, s, mode, lr, warmup)) in results]
                if not rows:
                    continue
                test = [r["test_balanced_accuracy"] for r in rows]
                summary[f"{mode}/{lr:g}/{warmup}"] = {"test_balanced_accuracy": float(np.mean(test)),
                                                      "near_chance": sum(t < NEAR_CHANCE for t in test)}
                print(f"| {mode} | {lr:g} | {warmup} | {len(rows)} | {fmt([r['train_balanced_accuracy'] for r in rows])} | "
                      f"{fmt(test)} | {sum(t < NEAR_CHANCE for t in test)} | "
                      f"{sum(r['collapsed_epoch'] is not None for r in rows)} | {np.mean([r['seconds'] for r in rows]):.0f} |")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "summary": summary}))


if __name__ == "__main__":
    main()
