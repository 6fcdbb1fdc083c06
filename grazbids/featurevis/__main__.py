"""Feature visualisation (activation maximisation) of a grazbids model bundle.

Optimises an image on the model's template grid so that a class logit, the mean
activation of one channel of a Conv3d layer, or one unit of it is as large as possible,
and writes OUT_DIR/featurevis_<objective>.nii.gz (template affine), a JSON sidecar that
records the method and every parameter, and a PNG figure over the template.

Penalty weights are sums over voxels (per-voxel trade-offs): with --l2 W a voxel stays
bright only where the objective gains more than 2*W*x per unit of intensity. Compare
them with ObjectiveGradientAtStart in the sidecar (mean |d objective / d voxel|; about
1e-3 for a 2 mm GrazPlusNet logit). The image is in normalised intensity units (the
model's input scale, [0, 2]).

examples:
  python -m grazbids.featurevis BUNDLE --list-layers
  python -m grazbids.featurevis BUNDLE out --class AD --l2 2e-4 --tv 2e-4 --fourier --jitter 2
  python -m grazbids.featurevis BUNDLE out --channel convs.6 3 --start template --iterations 100
  python -m grazbids.featurevis BUNDLE out --neuron convs.7 0 3 4 3
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..engine.bundle import ModelBundleError, load_bundle
from ..exitcodes import ExitCode
from ..templates import TemplateNotFoundError
from .ascent import AscentSettings
from .from_bundle import TEMPLATE_START, visualise_bundle
from .objectives import Channel, Neuron, ObjectiveError, feature_layers
from .regularisers import Regularisers

PROG = "python -m grazbids.featurevis"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="model bundle folder (model.safetensors + model_card.json)")
    p.add_argument("out_dir", type=Path, nargs="?", help="output folder (created if missing)")
    what = p.add_argument_group("objective (choose one)").add_mutually_exclusive_group()
    what.add_argument("--class", dest="class_", metavar="NAME", help="class logit, by class name (model card) or index")
    what.add_argument("--channel", nargs=2, metavar=("LAYER", "C"), help="mean activation of channel C of a Conv3d layer")
    what.add_argument("--neuron", nargs="+", metavar="ARG",
                      help="one unit: LAYER C [I J K] (voxel of the layer's output grid; default its centre)")
    what.add_argument("--list-layers", action="store_true", help="print the classes and Conv3d layers, then exit")

    run = p.add_argument_group("optimisation")
    run.add_argument("--iterations", type=int, default=200, help="Adam steps (default 200)")
    run.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    run.add_argument("--seed", type=int, default=0, help="seed of the start noise and jitter (default 0)")
    run.add_argument("--start", default="noise",
                     help="noise (default; 0.5 + 0.1 * noise, 1/f-coloured with --fourier), zeros, "
                          f"{TEMPLATE_START} (the template T1w, a mean brain), or a NIfTI on the template grid")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")

    reg = p.add_argument_group("regularisers (0 = off)")
    reg.add_argument("--l2", type=float, default=0.0, help="weight of sum(x^2) in the brain")
    reg.add_argument("--l1", type=float, default=0.0, help="weight of sum(|x|) in the brain")
    reg.add_argument("--tv", type=float, default=0.0, help="weight of the total variation (sum |neighbour difference|)")
    reg.add_argument("--blur-every", type=int, default=0, metavar="K", help="Gaussian blur of the image every K steps")
    reg.add_argument("--blur-sigma", type=float, default=0.5, help="blur sigma in voxels (default 0.5)")
    reg.add_argument("--jitter", type=int, default=0, metavar="N", help="random roll by up to N voxels per axis each step")
    reg.add_argument("--fourier", action="store_true", help="decorrelated Fourier parameterisation (1/f scaling)")
    reg.add_argument("--fourier-decay", type=float, default=1.0, help="exponent of the 1/f scaling (default 1)")
    reg.add_argument("--no-mask", action="store_true", help="optimise the whole grid, not only the template brain mask")
    reg.add_argument("--no-clamp", action="store_true", help="do not clamp to the model's input range [0, clip_max]")
    return p


def _objective(args, parser: argparse.ArgumentParser):
    if args.class_ is not None:
        return args.class_
    try:
        if args.channel:
            return Channel(args.channel[0], int(args.channel[1]))
        if args.neuron:
            if len(args.neuron) not in (2, 5):
                parser.error("--neuron takes LAYER C or LAYER C I J K")
            layer, *numbers = args.neuron
            numbers = [int(v) for v in numbers]
            return Neuron(layer, numbers[0], tuple(numbers[1:]) if len(numbers) == 4 else None)
    except ValueError:
        parser.error("channel and voxel indices must be integers")
    parser.error("choose an objective: --class, --channel or --neuron (or --list-layers)")


def _list_layers(bundle: Path) -> None:
    model, card = load_bundle(bundle)
    print("classes:", ", ".join(f"{i}={c}" for i, c in enumerate(card["classes"])))
    for name, layer in feature_layers(model).items():
        print(f"{name}: Conv3d, {layer.out_channels} channels")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.list_layers:
            _list_layers(args.bundle)
            return ExitCode.OK
        objective = _objective(args, parser)
        if args.out_dir is None:
            parser.error("OUT_DIR is required")
        regs = Regularisers(l2=args.l2, l1=args.l1, tv=args.tv, blur_every=args.blur_every,
                            blur_sigma=args.blur_sigma, jitter=args.jitter, fourier=args.fourier,
                            fourier_decay=args.fourier_decay)
        start = args.start if args.start in ("noise", "zeros") else "image"
        settings = AscentSettings(iterations=args.iterations, lr=args.lr, seed=args.seed, start=start,
                                  regularisers=regs)
        outputs = visualise_bundle(args.bundle, args.out_dir, objective, settings,
                                   start_image=args.start if start == "image" else None,
                                   use_mask=not args.no_mask, clamp=not args.no_clamp, device=args.device)
    except ModelBundleError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.MISSING_INPUT if not args.bundle.exists() else ExitCode.BAD_DATA
    except TemplateNotFoundError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.MISSING_INPUT
    except ObjectiveError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    except (ValueError, FloatingPointError, RuntimeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ExitCode.BAD_DATA
    print(f"{outputs.nifti}\n{outputs.sidecar}\n{outputs.figure}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
