"""``grazbids-simulate``: write a simulated BIDS cohort (see docs/simulation.md)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network at run time (Nipype's version check)
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")

from .. import __version__  # noqa: E402
from ..exitcodes import ExitCode, GrazbidsError  # noqa: E402
from .config import BACKGROUNDS, DEFAULT_STRENGTH, EFFECTS, SimulationConfig  # noqa: E402
from .confounds import SHORTCUTS  # noqa: E402
from .regions import REGIONS, describe_regions  # noqa: E402

LOGGER = logging.getLogger("grazbids.simulate")
_DEFAULTS = SimulationConfig()


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage; grazbids uses 64 (EX_USAGE)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="grazbids-simulate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Simulate a BIDS dataset of T1w scans with a known disease effect in patients "
            "and a label-correlated shortcut confound outside the brain, plus the ground "
            "truth (effect and confound masks, native and template space) in "
            "derivatives/simulation. Deterministic from --seed. See docs/simulation.md."),
        epilog="effect regions (MNI152NLin2009aSym mm):\n" + describe_regions())
    add = parser.add_argument
    add("output_dir", help="folder to create (must be empty or absent unless --overwrite)")
    add("--version", action="version", version=f"grazbids-simulate {__version__}")

    cohort = parser.add_argument_group("cohort")
    cohort.add_argument("--n-train", type=int, default=_DEFAULTS.n_train,
                        help="participants in the training split, half patients (default: %(default)s)")
    cohort.add_argument("--n-test", type=int, default=_DEFAULTS.n_test,
                        help="participants in the test split, half patients (default: %(default)s)")
    cohort.add_argument("--seed", type=int, default=_DEFAULTS.seed,
                        help="random seed; the same command writes byte-identical files "
                             "(default: %(default)s)")

    effect = parser.add_argument_group("disease effect (patients only)")
    effect.add_argument("--effect", choices=EFFECTS, default=_DEFAULTS.effect,
                        help="atrophy: smooth localised deformation (ventricles enlarge, other "
                             "regions shrink); lesion: intensity change of an ellipsoid/blob; "
                             "none: no effect (default: %(default)s)")
    effect.add_argument("--effect-region", action="append", choices=list(REGIONS),
                        metavar="REGION", dest="effect_regions",
                        help="where the effect goes; repeat for several (default: "
                             "lateral-ventricles for atrophy, left-frontal-wm for lesion). "
                             f"Choices: {', '.join(REGIONS)}")
    effect.add_argument("--effect-strength", type=float, default=None,
                        help="atrophy: relative change of linear size at the region centre, "
                             f"(0, 0.5] (default {DEFAULT_STRENGTH['atrophy']}); lesion: "
                             f"relative intensity change, (0, 1] (default "
                             f"{DEFAULT_STRENGTH['lesion']})")
    effect.add_argument("--effect-contrast", choices=("hypo", "hyper"),
                        default=_DEFAULTS.effect_contrast,
                        help="lesion: darker or brighter (default: %(default)s)")
    effect.add_argument("--lesion-shape", choices=("ellipsoid", "blob"),
                        default=_DEFAULTS.lesion_shape,
                        help="lesion: the region's ellipsoid, or a random smooth blob around "
                             "it (default: %(default)s)")

    shortcut = parser.add_argument_group("shortcut confound (outside the brain)")
    shortcut.add_argument("--shortcut", choices=SHORTCUTS, default=_DEFAULTS.shortcut,
                          help="marker: bright sphere beside the head; background: intensity "
                               "offset outside the brain; padding: zero-filled border (needs "
                               "--background noise); ghost: faint N/2 ghost of the head outside "
                               "the brain (default: %(default)s)")
    shortcut.add_argument("--shortcut-correlation", type=float,
                          default=_DEFAULTS.shortcut_correlation,
                          help="train split: the confound is in this fraction of patients and "
                               "1 minus it of controls (default: %(default)s)")
    shortcut.add_argument("--test-correlation", type=float, default=_DEFAULTS.test_correlation,
                          help="the same for the test split; 0.5 = decorrelated "
                               "(default: %(default)s)")

    source = parser.add_argument_group("anatomy and acquisition")
    source.add_argument("--anatomy", nargs="+", metavar="PATH", default=[],
                        help="skull-stripped T1w files or BIDS folders whose T1w are cycled "
                             "through (each registered affinely to the template once); "
                             "default: the embedded MNI152NLin2009aSym brain")
    source.add_argument("--voxel-size", type=float, default=_DEFAULTS.voxel_size,
                        help="isotropic voxel size of the scans, mm (default: %(default)s)")
    source.add_argument("--fov", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        default=list(_DEFAULTS.fov_mm),
                        help="field of view, mm (default: %(default)s)")
    source.add_argument("--max-rotation", type=float, default=_DEFAULTS.max_rotation_deg,
                        help="head pose: uniform rotation about each axis up to this many "
                             "degrees (default: %(default)s)")
    source.add_argument("--max-translation", type=float, default=_DEFAULTS.max_translation_mm,
                        help="head pose: uniform shift along each axis up to this many mm "
                             "(default: %(default)s)")
    source.add_argument("--deformation", type=float, default=_DEFAULTS.deformation_mm,
                        help="individual anatomy: s.d. of the smooth random displacement's "
                             "control points, mm (default: %(default)s)")
    source.add_argument("--bias-strength", type=float, default=_DEFAULTS.bias_strength,
                        help="bias field exp(b) with max |b| = this (default: %(default)s)")
    source.add_argument("--noise", type=float, default=_DEFAULTS.noise,
                        help="Rician noise sigma relative to the brain median "
                             "(default: %(default)s)")
    source.add_argument("--intensity-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=list(_DEFAULTS.intensity_scale),
                        help="global scanner gain, log-uniform (default: %(default)s)")
    source.add_argument("--background", choices=BACKGROUNDS, default=_DEFAULTS.background,
                        help="zero: skull-stripped style, exactly 0 outside the brain (and "
                             "confound); noise: Rician noise everywhere (default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--nprocs", type=int, default=min(2, _available_cpus()),
                     help="worker processes; the output does not depend on it "
                          "(default: %(default)s)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a non-empty output folder")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig(
        n_train=args.n_train, n_test=args.n_test, seed=args.seed, effect=args.effect,
        effect_regions=tuple(args.effect_regions or ()), effect_strength=args.effect_strength,
        effect_contrast=args.effect_contrast, lesion_shape=args.lesion_shape,
        shortcut=args.shortcut, shortcut_correlation=args.shortcut_correlation,
        test_correlation=args.test_correlation, anatomy=tuple(args.anatomy),
        voxel_size=args.voxel_size, fov_mm=tuple(args.fov),
        max_rotation_deg=args.max_rotation, max_translation_mm=args.max_translation,
        deformation_mm=args.deformation, bias_strength=args.bias_strength, noise=args.noise,
        intensity_scale=tuple(args.intensity_scale), background=args.background)


def canonical_command(config: SimulationConfig) -> str:
    """The command line that reproduces `config` (output folder left as a placeholder)."""
    parts = ["grazbids-simulate", "OUTPUT_DIR", "--n-train", config.n_train, "--n-test",
             config.n_test, "--seed", config.seed, "--effect", config.effect]
    for region in config.effect_regions:
        parts += ["--effect-region", region]
    if config.effect_strength is not None:
        parts += ["--effect-strength", config.effect_strength]
    parts += ["--effect-contrast", config.effect_contrast, "--lesion-shape", config.lesion_shape,
              "--shortcut", config.shortcut, "--shortcut-correlation",
              config.shortcut_correlation, "--test-correlation", config.test_correlation]
    if config.anatomy:
        parts += ["--anatomy", *config.anatomy]
    parts += ["--voxel-size", config.voxel_size, "--fov", *config.fov_mm,
              "--max-rotation", config.max_rotation_deg,
              "--max-translation", config.max_translation_mm,
              "--deformation", config.deformation_mm, "--bias-strength", config.bias_strength,
              "--noise", config.noise, "--intensity-scale", *config.intensity_scale,
              "--background", config.background]
    return " ".join(shlex.quote(f"{p:g}" if isinstance(p, float) else str(p)) for p in parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    LOGGER.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.nprocs < 1:
        build_parser().error(f"--nprocs {args.nprocs}: at least 1")
    config = config_from_args(args)
    from .cohort import simulate_cohort  # heavy imports after argument parsing

    try:
        simulate_cohort(config, args.output_dir, overwrite=args.overwrite, nprocs=args.nprocs,
                        command=canonical_command(config))
    except GrazbidsError as exc:
        print(f"grazbids-simulate: error: {exc.message}", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        print("grazbids-simulate: interrupted; nothing was written", file=sys.stderr)
        return 130
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
