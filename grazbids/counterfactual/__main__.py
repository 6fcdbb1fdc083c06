"""Counterfactual warp simulator (Liu et al., IPMI 2021) for a grazbids classifier bundle.

train: fit a conditional 3D U-Net that warps an image so that the bundle's frozen
  classifier changes its decision (inject the disease pattern into images of the other
  classes, remove it from images of the disease class), on the classifier's own
  preprocessed cohort; writes BUNDLE/simulator/ (safetensors + card naming the
  classifier by the SHA-256 of its weights).
apply: for one template-space T1w and brain mask, write per direction the simulated
  image, the displacement field, the log-Jacobian map (log volume change, < 0
  shrinkage) and a JSON sidecar with the classifier's probabilities before and after.

exit codes: 0 ok; 64 bad command line; 65 unusable input (simulator made for another
classifier, truncated bundle, one-class classifier, images on another grid); 66 a
bundle or input that does not exist.

examples:
  python -m grazbids.counterfactual train OUT/group/mode-grazplus/model BIDS OUT --epochs 20
  python -m grazbids.counterfactual train BUNDLE BIDS OUT --participant-label 001 002 --diffeomorphic
  python -m grazbids.counterfactual apply BUNDLE T1W_TEMPLATE MASK_TEMPLATE OUTDIR --prefix sub-001_
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..engine.bundle import ModelBundleError
from ..exitcodes import ExitCode

PROG = "python -m grazbids.counterfactual"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # grazbids uses 64 (EX_USAGE), not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from .losses import SMOOTHNESS_PENALTIES
    from .training import DEFAULT_SMOOTHNESS_WEIGHT, SimulatorSettings

    d = SimulatorSettings()
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a simulator against a classifier bundle")
    t.add_argument("bundle", type=Path, help="classifier bundle folder (model.safetensors + model_card.json)")
    t.add_argument("bids_dir", type=Path, help="BIDS dataset with participants.tsv (the classes)")
    t.add_argument("derivatives_dir", type=Path, help="grazbids output folder with the template-space T1w")
    t.add_argument("--participant-label", nargs="+", default=None, help="train on these participants (default: all)")
    t.add_argument("--positive-class", default=None, help="the disease class (default: the last class of the card)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    t.add_argument("--learning-rate", type=float, default=d.learning_rate, help="Adam, default %(default)s")
    t.add_argument("--margin", type=float, default=d.margin,
                   help="required shift of the disease log-odds (hinge margin); decisions flip only where it "
                        "exceeds the classifier's |log-odds| (see the flip fraction), default %(default)s")
    t.add_argument("--smoothness", choices=SMOOTHNESS_PENALTIES, default=d.smoothness_penalty,
                   help="field regulariser: mean squared (l2, default) or absolute (l1, the paper's) finite "
                        "differences of the field; l1 let adversarial warps of the brain outline through")
    t.add_argument("--smoothness-weight", type=float, default=None,
                   help=f"default {DEFAULT_SMOOTHNESS_WEIGHT['l2']:g} for l2, {DEFAULT_SMOOTHNESS_WEIGHT['l1']:g} for l1")
    t.add_argument("--cycle-weight", type=float, default=d.cycle_weight, help="default %(default)s")
    t.add_argument("--displacement-weight", type=float, default=d.displacement_weight,
                   help="> 0: the second phase adds this weight x the mean squared displacement (voxels^2); it "
                        "stopped the warp flipping decisions on one of three classifiers, so check the flip "
                        "fraction (default %(default)s)")
    t.add_argument("--centre-field", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the field's mean inside the brain in the second phase and after training, so the "
                        "warp cannot flip decisions by shifting the whole brain, which no smoothness penalty charges "
                        "(default on; --no-centre-field: one phase, as the paper)")
    t.add_argument("--second-phase-epochs", "--displacement-epochs", dest="second_phase_epochs", type=int,
                   default=None, help="epochs of the second phase (centred field, displacement term), counted in "
                                      "--epochs (default: a quarter of them)")
    t.add_argument("--diffeomorphic", action="store_true",
                   help="stationary velocity integrated by scaling and squaring (no folding)")
    t.add_argument("--field-downsample", type=int, default=2,
                   help="the U-Net works at 1/N of the image resolution (default %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints (resume); default a folder in the system temp named after the bundle")
    a = sub.add_parser("apply", help="simulate inject/remove for one preprocessed image")
    a.add_argument("bundle", type=Path)
    a.add_argument("t1w", type=Path, help="T1w on the model's template grid")
    a.add_argument("mask", type=Path, help="brain mask on the same grid")
    a.add_argument("out_dir", type=Path)
    a.add_argument("--prefix", default="", help="file name prefix, e.g. sub-001_")
    a.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def _positive(value: int | float, name: str, parser) -> None:
    if not value > 0:
        parser.error(f"{name} must be positive, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from .bundle import SimulatorBundleError
    from .cohort import CohortError
    from .run import apply_to_image, train_simulator
    from .training import SimulatorSettings

    try:
        if args.command == "train":
            for name in ("epochs", "batch_size", "learning_rate", "field_downsample"):
                _positive(getattr(args, name), "--" + name.replace("_", "-"), parser)
            if args.displacement_weight < 0:
                parser.error(f"--displacement-weight must be >= 0, got {args.displacement_weight}")
            if args.second_phase_epochs is not None and not 0 <= args.second_phase_epochs < args.epochs:
                parser.error(f"--second-phase-epochs must be from 0 to --epochs - 1, got {args.second_phase_epochs}")
            from .cohort import load_training_images
            from .run import check_classifier_card

            card = check_classifier_card(args.bundle)
            images, masks, labels, participants = load_training_images(card, args.bids_dir, args.derivatives_dir,
                                                                       args.participant_label)
            settings = SimulatorSettings(epochs=args.epochs, batch_size=args.batch_size,
                                         learning_rate=args.learning_rate, margin=args.margin,
                                         smoothness_penalty=args.smoothness, smoothness_weight=args.smoothness_weight,
                                         cycle_weight=args.cycle_weight,
                                         displacement_weight=args.displacement_weight,
                                         second_phase_epochs=args.second_phase_epochs,
                                         seed=args.seed, device=args.device)
            out = train_simulator(args.bundle, images, masks, labels, settings, positive_class=args.positive_class,
                                  diffeomorphic=args.diffeomorphic, centre_field=args.centre_field,
                                  field_downsample=args.field_downsample,
                                  workdir=args.work_dir,
                                  training_data={"bids_dir": str(args.bids_dir.resolve()),
                                                 "participants": participants})
            print(out)
        else:
            written = apply_to_image(args.bundle, args.t1w, args.mask, args.out_dir, args.prefix, args.device)
            for name, entry in written.items():
                meta = entry["metadata"]
                print(f"{name}: {meta['PredictedBefore']} -> {meta['PredictedAfter']} "
                      f"(log-odds {meta['LogOddsBefore']:.3f} -> {meta['LogOddsAfter']:.3f}), "
                      f"folded {meta['FoldedFraction']:.4f}")
                for path in entry["paths"].values():
                    print(f"  {path}")
    except (ModelBundleError, SimulatorBundleError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.MISSING_INPUT if not Path(args.bundle).exists() else ExitCode.BAD_DATA
    except FileNotFoundError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.MISSING_INPUT
    except (CohortError, ValueError, RuntimeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.BAD_DATA
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
