"""The Graz+ claim on a cohort with a known effect and a shortcut, end to end through the CLI.

1. `grazbids-simulate`: a training split where a marker outside the brain goes with the
   diagnosis (`--shortcut-correlation`, default 0.9) and a test split where it does not
   (`--test-correlation`, default 0.5); every patient has the real effect.
2. `grazbids ... participant` on everyone (registration to the template, masks).
3. `grazbids ... group --participant-label <training split>` trains `plain`, `masked` and
   `grazplus` with the same seed and folds.
4. `grazbids ... participant --model <bundle of each mode>` on the test split.
5. From the written derivatives: balanced accuracy on the test split (and on its
   "conflict" participants, whose marker contradicts their diagnosis), the fraction of
   positive relevance inside the brain, inside the true effect (patients) and inside the
   marker (participants with one), and the pointing-game rate on the effect.

It prints a markdown table and writes `<work>/shortcut_benchmark.json`.

    python benchmarks/shortcut_benchmark.py --work /tmp/shortcut             # defaults
    python benchmarks/shortcut_benchmark.py --work /tmp/sc --n-train 24 --epochs 5 --cv-folds 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grazbids.engine import balanced_accuracy  # noqa: E402
from grazbids.explain.targets import method_desc  # noqa: E402
from grazbids.evaluate.explanation_table import participant_row  # noqa: E402

MODES = ("plain", "masked", "grazplus")
TEMPLATE, RESOLUTION = "MNI152NLin2009aSym", 2


def run(step: str, command: list[str], timings: dict) -> None:
    """Run one CLI step, stream its output, stop the benchmark if it fails."""
    print(f"\n=== {step}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO)
    timings[step] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        sys.exit(f"{step} failed with exit code {proc.returncode}")


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def _template_file(root: Path, participant: str, desc: str, suffix: str) -> Path:
    name = f"{participant}_space-{TEMPLATE}_res-{RESOLUTION}_desc-{desc}_{suffix}.nii.gz"
    hits = sorted(root.glob(f"{participant}/**/{name}"))
    if not hits:
        raise FileNotFoundError(f"{root}: no {name}")
    return hits[0]


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj, dtype=np.float64)


def evaluate_mode(mode: str, bids: Path, preproc: Path, test_out: Path, test: pd.DataFrame,
                  maps: tuple[str, ...] = ("zplus",)) -> dict:
    """Test-split accuracy and where each test map (``desc`` values) puts relevance, from the
    derivatives (explanation_table.participant_row: the group level's own metrics)."""
    truth = bids / "derivatives" / "simulation"
    classes = sorted(test["diagnosis"].unique())
    y_true, y_pred, conflict, rows = [], [], [], {desc: [] for desc in maps}
    for p in test.itertuples():
        pid = p.participant_id
        predictions = pd.read_csv(next((test_out / pid).glob(f"**/{pid}*_predictions.tsv")), sep="\t")
        y_true.append(classes.index(p.diagnosis))
        y_pred.append(classes.index(str(predictions["predicted_label"].iloc[0])))
        conflict.append((p.diagnosis == "patient") != bool(p.shortcut))
        brain = _load(_template_file(preproc, pid, "brain", "mask"))
        references = {name: _template_file(truth, pid, name, "mask") for name in ("effect", "shortcut")}
        for desc in maps:
            heat = _load(_template_file(test_out, pid, desc, "heatmap"))
            rows[desc].append(participant_row(heat, brain, {}, references))
    y_true, y_pred, conflict = np.array(y_true), np.array(y_pred), np.array(conflict)
    frames = {desc: pd.DataFrame(r) for desc, r in rows.items()}
    means = {desc: {c: float(f[c].mean()) if c in f else np.nan for c in METRICS} for desc, f in frames.items()}
    return {
        "test_balanced_accuracy": balanced_accuracy(y_true, y_pred, len(classes)),
        "conflict_accuracy": float(np.mean(y_true[conflict] == y_pred[conflict])) if conflict.any() else np.nan,
        "n_conflict": int(conflict.sum()),
        "maps": means,
    }


METRICS = ("relevance_inside_brain", "relevance_inside_effect", "pointing_game_effect", "roc_auc_effect",
           "relevance_inside_shortcut")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset, derivatives, work dirs")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--effect", default="lesion", help="grazbids-simulate --effect")
    parser.add_argument("--shortcut", default="marker", help="grazbids-simulate --shortcut")
    parser.add_argument("--shortcut-correlation", type=float, default=0.9)
    parser.add_argument("--test-correlation", type=float, default=0.5)
    parser.add_argument("--simulate-args", default="", help="extra grazbids-simulate options, one string")
    parser.add_argument("--cv-folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=3e-4)  # 1e-3 killed networks (docs/simulation.md)
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--nprocs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--explain", nargs="*", default=[], metavar="METHOD",
                        help="further grazbids --explain methods at inference, evaluated like the z+ map")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only re-read the outputs of an earlier run in --work")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    bids, preproc, nipype_work = work / "bids", work / "derivatives", work / "nipype"
    grazbids, simulate = _bin("grazbids"), _bin("grazbids-simulate")
    common = ["--skip-bids-validation", "-w", str(nipype_work), "--nprocs", str(args.nprocs),
              "--random-seed", str(args.seed)]
    timings: dict[str, float] = {}
    execute = (lambda step, command, timings: None) if args.evaluate_only else run  # noqa: E731
    if not (bids / "participants.tsv").exists():
        execute("simulate", [simulate, str(bids), "--n-train", str(args.n_train), "--n-test", str(args.n_test),
                         "--effect", args.effect, "--shortcut", args.shortcut,
                         "--shortcut-correlation", str(args.shortcut_correlation),
                         "--test-correlation", str(args.test_correlation), "--seed", str(args.seed),
                         *args.simulate_args.split()], timings)
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    train = participants[participants["split"] == "train"]
    test = participants[participants["split"] == "test"]
    labels = lambda frame: [p.removeprefix("sub-") for p in frame["participant_id"]]  # noqa: E731

    execute("participant (all)", [grazbids, str(bids), str(preproc), "participant", *common], timings)
    execute("group (training split)", [grazbids, str(bids), str(preproc), "group", *common,
                                   "--participant-label", *labels(train), "--target-column", "diagnosis",
                                   "--mode", *args.modes, "--cv-folds", str(args.cv_folds),
                                   "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
                                   "--accumulation-steps", str(args.accumulation_steps)], timings)
    results = {}
    modes = pd.read_csv(preproc / "group" / "modes_summary.tsv", sep="\t").set_index("mode")
    for mode in args.modes:
        test_out = work / f"test-{mode}"
        execute(f"inference {mode} (test split)", [
            grazbids, str(bids), str(test_out), "participant", *common, "--participant-label", *labels(test),
            "--model", str(preproc / "group" / f"mode-{mode}" / "model"),
            *(["--explain", *args.explain] if args.explain else [])], timings)
        cv = json.loads((preproc / "group" / f"mode-{mode}" / "cv_metrics.json").read_text())
        results[mode] = {
            "cv_balanced_accuracy_mean": float(modes.loc[mode, "balanced_accuracy_mean"]),
            "cv_balanced_accuracy_sd": float(modes.loc[mode, "balanced_accuracy_sd"]),
            # a dead network (constant output) makes its row meaningless: say so
            "folds_collapsed": [f["fold"] for f in cv["per_fold"] if f.get("collapsed_epoch") is not None],
            "final_model_collapsed_epoch": cv.get("final_model_collapsed_epoch"),
            **evaluate_mode(mode, bids, preproc, test_out, test,
                            ("zplus", *(method_desc(m) for m in args.explain))),
        }

    print("\n| mode | CV BA (train split, shortcut "
          f"{args.shortcut_correlation:g}) | test BA (shortcut {args.test_correlation:g}) | "
          "test acc. on conflict cases | relevance in brain | in true effect | pointing game | in marker |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        z = r["maps"]["zplus"]
        print(f"| {mode} | {r['cv_balanced_accuracy_mean']:.2f} ± {r['cv_balanced_accuracy_sd']:.2f} "
              f"| {r['test_balanced_accuracy']:.2f} | {r['conflict_accuracy']:.2f} (n={r['n_conflict']}) "
              f"| {z['relevance_inside_brain']:.3f} | {z['relevance_inside_effect']:.3f} "
              f"| {z['pointing_game_effect']:.2f} | {z['relevance_inside_shortcut']:.4f} |")
    print("\nTest maps per method (means over the test split; effect metrics over patients):")
    print("| mode | map | relevance in brain | in true effect | pointing game | voxel ROC-AUC (effect) | in marker |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        for desc, m in r["maps"].items():
            print(f"| {mode} | {desc} | {m['relevance_inside_brain']:.3f} | {m['relevance_inside_effect']:.3f} "
                  f"| {m['pointing_game_effect']:.2f} | {m['roc_auc_effect']:.2f} | {m['relevance_inside_shortcut']:.4f} |")
    for mode, r in results.items():
        if r["folds_collapsed"] or r["final_model_collapsed_epoch"] is not None:
            print(f"WARNING {mode}: the network died (constant output) in CV fold(s) {r['folds_collapsed']}"
                  f"{', and the final model' if r['final_model_collapsed_epoch'] is not None else ''}; "
                  "its row is not a valid comparison (lower --learning-rate)")
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
              "cpus": os.cpu_count(), "timings_s": timings, "results": results,
              "n_train": len(train), "n_test": len(test)}
    (work / "shortcut_benchmark.json").write_text(json.dumps(report, indent=2))
    print(f"\ntimings (s): {timings}")


if __name__ == "__main__":
    main()
