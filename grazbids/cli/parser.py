"""Command-line interface: ``grazbids bids_dir output_dir {participant,group} [options]``.

``parse_args`` turns argv into a :class:`grazbids.config.RunConfig`, checking everything
that can be checked without touching the data (option values, label syntax, path
overlaps, the plugin file). Problems raise :class:`GrazbidsError` with exit code 64
(usage), 17 (unknown analysis level) or 66 (a named file is missing).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

from .. import __version__
from .. import config as cfg
from ..exitcodes import ExitCode, GrazbidsError

BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")

# Nipype execution plugins (nipype.pipeline.plugins.<Name>Plugin); matched case-insensitively
NIPYPE_PLUGINS = (
    "Linear", "MultiProc", "LegacyMultiProc", "Debug", "IPython",
    "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph", "LSF", "OAR",
    "Condor", "DAGMan", "SomaFlow",
)
LOCAL_POOL_PLUGINS = ("MultiProc", "LegacyMultiProc")


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad usage; BIDS Apps use 64 (EX_USAGE)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


class _BoutiquesAction(argparse.Action):
    """``--boutiques``: print the Boutiques descriptor of this parser and exit 0 (as --version)."""

    prints_and_exits = True  # grazbids.boutiques leaves such options out of the descriptor

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..boutiques import descriptor_json

        parser._print_message(descriptor_json(build_parser()) + "\n", sys.stdout)
        parser.exit(ExitCode.OK)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:  # numpy's seeding limit
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {text}")
    return value


def _cv_folds(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"cross-validation needs at least 2 folds, got {text}")
    return value


# command-line options passed on to grazbids.engine.TrainSettings (same names)
TRAINING_OPTIONS = ("learning_rate", "warmup_epochs", "batch_size", "accumulation_steps", "relevance_weight", "guidance_loss",
                    "guidance_power", "outside_penalty", "outside_penalty_weight")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="grazbids",
        description=(
            "grazbids: relevance-guided (Graz+) 3D CNN training and explanation of brain "
            "T1w MRI, as a BIDS App. Participant level: register each T1w image to a "
            "template and make its brain mask (and, with --model, predict and write "
            "relevance maps). Group level: train and cross-validate classifiers of a "
            "participants.tsv column on the preprocessed images."
        ),
        epilog=(
            "Exit codes: 0 success, 1 some participant or the group step failed, 16 BIDS "
            "validation failed, 17 unknown analysis level, 18 filters selected no files, "
            "64 usage error, 65 unusable input data, 66 missing input, 73 cannot create "
            "output, 74 I/O error, 75 work folder in use by another run, 130 interrupted "
            "(SIGINT), 143 terminated (SIGTERM). See docs/usage.md."
        ),
            )
    parser.add_argument("bids_dir", type=Path, help="root folder of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path,
                        help="folder for the derivatives (e.g. <bids_dir>/derivatives/grazbids)")
    # no argparse choices here: an unknown level must exit with 17, not the usage code 64
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="processing stage: 'participant' (per subject) or 'group' (training)")
    parser.add_argument("--version", action="version", version=f"grazbids {__version__}")
    parser.add_argument("--boutiques", action=_BoutiquesAction,
                        help="print the Boutiques descriptor of this command line (JSON) and exit")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                        help="more log output: -v shows every Nipype node, -vv debug messages")

    bids = parser.add_argument_group("Options for selecting the input data")
    bids.add_argument("--participant-label", "--participant_label", dest="participant_labels",
                      nargs="+", metavar="LABEL", default=[],
                      help="participants to process, with or without 'sub-' (default: all)")
    bids.add_argument("--session-label", "--session_label", dest="session_labels", nargs="+",
                      metavar="LABEL", default=[],
                      help="only use T1w images of these sessions, with or without 'ses-' "
                           "(default: all sessions)")
    bids.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                      help="do not run bids-validator-deno on the input dataset first")

    perf = parser.add_argument_group("Resources and execution")
    perf.add_argument("-w", "--work-dir", type=Path, default=None, metavar="DIR",
                      help="Nipype working folder, kept for re-runs (default: "
                           "<output_dir>_work beside output_dir; a folder in the system temp "
                           "directory if that would fall inside bids_dir or cannot be created, "
                           "e.g. in a container)")
    perf.add_argument("--nprocs", "--nthreads", "--n_cpus", dest="nprocs", type=_positive_int,
                      default=None, metavar="N", help="processes run in parallel (default: all CPUs available)")
    perf.add_argument("--omp-nthreads", type=_positive_int, default=None, metavar="N",
                      help="threads one process may use (ANTs, PyTorch; default: min(8, nprocs))")
    perf.add_argument("--mem-gb", "--mem", "--mem_gb", dest="mem_gb", type=_positive_float,
                      default=None, metavar="GB", help="memory limit in GB for the MultiProc scheduler "
                                         "(default: Nipype's estimate of free memory)")
    perf.add_argument("--plugin", default=None, metavar="NAME",
                      help=f"Nipype plugin: {', '.join(NIPYPE_PLUGINS)} (default: "
                           f"{cfg.DEFAULT_PLUGIN}, or the one named in --plugin-config)")
    perf.add_argument("--plugin-config", type=Path, default=None, metavar="YAML",
                      help="YAML file with 'plugin:' and 'plugin_args:' (e.g. workflows/slurm.yml)")
    perf.add_argument("--stop-on-first-crash", action="store_true",
                      help="stop at the first failing node instead of finishing the others")

    space = parser.add_argument_group("Spatial normalisation")
    space.add_argument("--template", default=cfg.DEFAULT_TEMPLATE,
                       help="TemplateFlow template name (default: %(default)s, shipped with grazbids; "
                            "others must be in TEMPLATEFLOW_HOME, nothing is downloaded)")
    space.add_argument("--resolution", type=int, choices=cfg.RESOLUTIONS,
                       default=cfg.DEFAULT_RESOLUTION,
                       help="TemplateFlow resolution index of the template grid: 1 = 1 mm, 2 = 2 mm "
                            "(default: %(default)s)")
    space.add_argument("--registration", choices=cfg.REGISTRATIONS,
                       default=cfg.DEFAULT_REGISTRATION,
                       help="T1w-to-template registration (ANTs): rigid 6 dof, affine 12 dof, "
                            "or nonlinear (SyN after affine) (default: %(default)s)")
    space.add_argument("--input-image", choices=cfg.INPUT_IMAGES, default="brain",
                       help="group level: what the network sees of a raw head in template space: the "
                            "extracted brain or the whole (bias-corrected) head; the Graz+ relevance mask "
                            "is the brain mask either way. Brain-extracted inputs are used as they are "
                            "(default: %(default)s)")
    space.add_argument("--skull-strip", choices=cfg.SKULL_STRIP_MODES, default="auto",
                       help="N4 bias correction + brain extraction (deepbet) before registration: "
                            "auto = only for a T1w that is not brain-extracted (its signal is not a "
                            "plausible brain volume), force = always, skip = never (default: %(default)s)")

    dl = parser.add_argument_group("Deep learning")
    dl.add_argument("--device", choices=cfg.DEVICES, default="auto",
                    help="PyTorch device; auto = CUDA when available, else CPU (default: %(default)s)")
    dl.add_argument("--model", dest="model_dir", type=Path, default=None, metavar="PATH",
                    help="participant level: trained model bundle folder (model_card.json + "
                         "model.safetensors) to predict and explain each participant")
    dl.add_argument("--explain", nargs="+", choices=cfg.EXPLAIN_METHODS, default=[], metavar="METHOD",
                    help="further explanation maps besides z+ LRP: "
                         + ", ".join(cfg.EXPLAIN_METHODS) + ". Participant level, with --model: each "
                         "written in template and native space as desc-<method>_heatmap. Group level: "
                         "the out-of-fold maps of every held-out participant, summarised per mode in "
                         "group/mode-<mode>/explain-<method>/ (per-class mean maps, tissue and --atlas "
                         "shares). meaningful_perturbation takes about an hour per image on a CPU")
    dl.add_argument("--explain-target", default="predicted", metavar="CLASS",
                    help="class the --explain maps explain: 'predicted' (default), a class name of the "
                         "model, or 'softmax' (LRP rules only: the probability-weighted vector)")
    dl.add_argument("--target-column", default=None, metavar="COLUMN",
                    help="group level (required): participants.tsv column holding the classes")
    dl.add_argument("--mode", dest="modes", nargs="+", choices=cfg.MODES,
                    default=list(cfg.DEFAULT_MODES),
                    help="group level: training configurations to compare: plain CNN, "
                         "masked-input CNN, and/or Graz+ relevance-guided CNN (default: grazplus)")
    dl.add_argument("--cv-folds", type=_cv_folds, default=cfg.DEFAULT_CV_FOLDS, metavar="K",
                    help="group level: folds of the participant-wise cross-validation (default: %(default)s)")
    dl.add_argument("--epochs", type=_positive_int, default=cfg.DEFAULT_EPOCHS, metavar="N",
                    help="group level: training epochs per fold (default: %(default)s, as Graz+)")
    dl.add_argument("--learning-rate", type=_positive_float, default=None, metavar="LR",
                    help="group level: Adam learning rate (default: 1e-4, as Graz+)")
    dl.add_argument("--warmup-epochs", type=_positive_int, default=None, metavar="N",
                    help="group level: linear learning-rate warm-up, epoch e <= N trains at LR * e / N "
                         "(default: none)")
    dl.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                    help="group level: volumes per forward pass (default: 2)")
    dl.add_argument("--accumulation-steps", type=_positive_int, default=None, metavar="N",
                    help="group level: batches whose gradients are summed per optimiser step "
                         "(default: 4; effective batch = batch size x this)")
    dl.add_argument("--relevance-weight", type=_positive_float, default=None, metavar="W",
                    help="group level: weight of the Graz+ relevance term (default: 1.0)")
    dl.add_argument("--architecture", choices=("grazplus", "kondrateva"), default="grazplus",
                    help="group level: network to train: the Graz+ CNN (default) or the Kondrateva et al. "
                         "CNN with batch norm (modes plain and masked only: the Graz+ relevance loss needs "
                         "the Graz+ network's non-positive biases)")
    dl.add_argument("--guidance-mask", default=None, metavar="ENTITY",
                    help="group level, mode grazplus: guide relevance into this mask instead of the brain "
                         "mask, one per participant in template space, e.g. desc-lesion "
                         "(*_desc-lesion_mask.nii.gz in output_dir or the input's derivatives/) or label-GM "
                         "(grazbids' grey-matter probabilities)")
    dl.add_argument("--guidance-loss", choices=("additive", "ratio"), default=None,
                    help="group level, mode grazplus: relevance term: 'additive' CE - w * relevance in the "
                         "mask (Graz+, default) or 'ratio' CE / M^p, M = relevance in the mask / relevance "
                         "in the brain (Sefcik & Benesova)")
    dl.add_argument("--guidance-power", type=_positive_float, default=None, metavar="P",
                    help="group level: p of the ratio loss (default: 1)")
    dl.add_argument("--outside-penalty", choices=("none", "invariance", "gradient", "signed"), default=None,
                    help="group level, any mode: a loss term against shortcuts outside the brain that z+ "
                         "relevance does not see: 'invariance' penalises the change of the output when "
                         "everything outside the brain is set to 0, 'gradient' the input gradient outside "
                         "the brain (Ross et al. 2017), 'signed' the share of signed LRP-epsilon relevance "
                         "of the logit difference outside the brain (Graz+ architecture only), 'none' nothing "
                         "(the paper's Graz+); default invariance for --mode grazplus, none for the other "
                         "modes (measured: docs/simulation.md, Shortcut evidence)")
    dl.add_argument("--outside-penalty-weight", type=_positive_float, default=None, metavar="W",
                    help="group level: weight of --outside-penalty (default: 1.0)")
    dl.add_argument("--atlas", type=Path, default=None, metavar="DSEG",
                    help="group level: label image (dseg) in the template space of the run; the share of "
                         "each heat map's relevance per region goes to regions.tsv and regions_summary.tsv. "
                         "Region names from a TSV beside it with the same stem (columns index, name, as "
                         "TemplateFlow's *_dseg.tsv). None ships with grazbids (atlases are downloads)")
    dl.add_argument("--feature-visualisation", type=_positive_int, nargs="?", const=200, default=0, metavar="STEPS",
                    help="group level: after training, the input that maximises each class logit of each "
                         "mode's model (activation maximisation, Eitel et al.; jitter + periodic blur), as "
                         "NIfTI + JSON + PNG in group/mode-<mode>/featurevis/ and in the group report; STEPS "
                         "gradient-ascent steps per class (default 200, about 1 s each at 2 mm on a CPU)")
    dl.add_argument("--counterfactual", type=_positive_int, nargs="?", const=30, default=0, metavar="EPOCHS",
                    help="group level: after training, a counterfactual warp simulator (Liu et al. 2021) against "
                         "each mode's final model, EPOCHS epochs (default 30), saved in the model bundle "
                         "(model/simulator/); group-mean log-Jacobian maps per class and direction in "
                         "group/mode-<mode>/counterfactual/ (per region with --atlas). Participant level with a "
                         "--model that holds a simulator: simulated images and log-Jacobian maps per participant")
    dl.add_argument("--random-seed", type=_seed, default=cfg.DEFAULT_SEED, metavar="SEED",
                    help="seed for data splits, weight initialisation and shuffling (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None) -> cfg.RunConfig:
    """Parse and check the command line; raise GrazbidsError (17/64/66) on a problem."""
    ns = build_parser().parse_args(argv)

    if ns.analysis_level not in cfg.ANALYSIS_LEVELS:
        raise GrazbidsError(
            ExitCode.UNKNOWN_LEVEL,
            f"unknown analysis level {ns.analysis_level!r}: use 'participant' or 'group'",
        )
    bids_dir = ns.bids_dir.expanduser().resolve()
    output_dir = ns.output_dir.expanduser().resolve()
    check_output_location(bids_dir, output_dir)
    work_dir = ns.work_dir.expanduser().resolve() if ns.work_dir else default_work_dir(bids_dir, output_dir)
    check_work_location(bids_dir, output_dir, work_dir)

    if ns.analysis_level == "group" and not ns.target_column:
        raise GrazbidsError(ExitCode.USAGE,
                            "the group level needs --target-column (a column of participants.tsv)")
    if ns.architecture != "grazplus" and "grazplus" in ns.modes and ns.analysis_level == "group":
        raise GrazbidsError(ExitCode.USAGE, f"--architecture {ns.architecture} cannot be trained in mode grazplus "
                            "(its relevance loss needs the Graz+ network); use --mode plain and/or masked")
    if ns.architecture != "grazplus" and ns.outside_penalty == "signed" and ns.analysis_level == "group":
        raise GrazbidsError(ExitCode.USAGE, f"--outside-penalty signed needs the Graz+ network, not --architecture "
                            f"{ns.architecture}; use --outside-penalty invariance or gradient")
    if ns.explain and ns.analysis_level == "participant" and ns.model_dir is None:
        raise GrazbidsError(ExitCode.USAGE, "--explain needs --model (a trained model bundle to explain)")
    template = ns.template
    if not BIDS_LABEL.match(template):
        raise GrazbidsError(ExitCode.USAGE,
                            f"invalid template name {template!r}: TemplateFlow names are letters and digits")

    plugin, plugin_args = resolve_plugin(ns.plugin, ns.plugin_config)
    nprocs = ns.nprocs or available_cpus()
    omp_nthreads = ns.omp_nthreads or min(8, nprocs)
    if plugin in LOCAL_POOL_PLUGINS:
        # explicit command-line values win over the plugin file, the file over defaults
        if ns.nprocs or "n_procs" not in plugin_args:
            plugin_args["n_procs"] = nprocs
        nprocs = int(plugin_args["n_procs"])
        if ns.mem_gb is not None:
            plugin_args["memory_gb"] = ns.mem_gb
        # as fMRIPrep: run oversized nodes alone rather than refusing to start them, and
        # recycle worker processes so memory from PyTorch/ANTs is returned
        plugin_args.setdefault("raise_insufficient", False)
        plugin_args.setdefault("maxtasksperchild", 1)
        # workers start from a clean forkserver: a worker forked from a process whose
        # PyTorch/OpenMP thread pool is already running can hang forever in its first
        # parallel region (seen with the inference node when the caller had used torch)
        plugin_args.setdefault("mp_context", "forkserver")
        omp_nthreads = min(omp_nthreads, nprocs)  # a node may not need more CPUs than the pool has

    return cfg.RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=ns.analysis_level,
        work_dir=work_dir,
        participant_labels=normalize_labels(ns.participant_labels, "sub", "participant"),
        session_labels=normalize_labels(ns.session_labels, "ses", "session"),
        skip_bids_validation=ns.skip_bids_validation,
        template=template,
        resolution=ns.resolution,
        registration=ns.registration,
        skull_strip=ns.skull_strip,
        input_image=ns.input_image,
        device=ns.device,
        model_dir=ns.model_dir.expanduser().resolve() if ns.model_dir else None,
        explain=tuple(dict.fromkeys(ns.explain)),
        explain_target=ns.explain_target,
        target_column=ns.target_column,
        modes=tuple(dict.fromkeys(ns.modes)),
        cv_folds=ns.cv_folds,
        epochs=ns.epochs,
        training_options={key: getattr(ns, key) for key in TRAINING_OPTIONS if getattr(ns, key) is not None},
        guidance_mask=ns.guidance_mask,
        architecture=ns.architecture,
        atlas=ns.atlas.expanduser().resolve() if ns.atlas else None,
        feature_visualisation=ns.feature_visualisation,
        counterfactual=ns.counterfactual,
        random_seed=ns.random_seed,
        nprocs=nprocs,
        omp_nthreads=omp_nthreads,
        mem_gb=ns.mem_gb,
        plugin=plugin,
        plugin_args=plugin_args,
        stop_on_first_crash=ns.stop_on_first_crash,
        verbosity=ns.verbosity,
    )


def normalize_labels(values: list[str], prefix: str, what: str) -> tuple[str, ...]:
    """Strip an optional 'sub-'/'ses-' prefix; refuse anything that is not a BIDS label."""
    labels = []
    for value in values:
        label = value[len(prefix) + 1:] if value.startswith(f"{prefix}-") else value
        if not BIDS_LABEL.match(label):
            raise GrazbidsError(
                ExitCode.USAGE,
                f"invalid {what} label {value!r}: BIDS labels contain only letters and digits "
                f"(optionally prefixed with '{prefix}-')",
            )
        labels.append(label)
    return tuple(dict.fromkeys(labels))


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(bids_dir: Path, output_dir: Path) -> None:
    if output_dir == bids_dir:
        raise GrazbidsError(ExitCode.USAGE,
                            f"output_dir is the input dataset ({bids_dir}); choose another folder, "
                            f"e.g. {bids_dir / 'derivatives' / 'grazbids'}")
    # derivatives written around the raw dataset (output_dir = its parent or higher) would mix
    # with other folders there, and the next run's layout would index them
    if _is_within(bids_dir, output_dir):
        raise GrazbidsError(ExitCode.USAGE,
                            f"output_dir {output_dir} contains the input dataset {bids_dir}; choose a "
                            f"folder beside it or under {bids_dir / 'derivatives'}")
    # anywhere else inside the raw dataset, outputs would be indexed as raw data next time
    if _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / "derivatives"):
        raise GrazbidsError(ExitCode.USAGE,
                            f"output_dir {output_dir} is inside the input dataset but not under "
                            f"{bids_dir / 'derivatives'}; choose a folder there or outside the dataset")


def check_work_location(bids_dir: Path, output_dir: Path, work_dir: Path) -> None:
    if _is_within(work_dir, bids_dir):
        raise GrazbidsError(ExitCode.USAGE,
                            f"the work folder {work_dir} is inside the input dataset {bids_dir}; "
                            "choose another with -w/--work-dir")
    if _is_within(work_dir, output_dir):
        raise GrazbidsError(ExitCode.USAGE,
                            f"the work folder {work_dir} is inside output_dir {output_dir}, whose "
                            "contents must stay a valid BIDS derivative; choose another with -w/--work-dir")


def default_work_dir(bids_dir: Path, output_dir: Path) -> Path:
    """``<output_dir>_work`` beside output_dir, or a stable per-output temp folder.

    The temp fallback is used when the sibling would land inside the input dataset (the
    usual ``<bids_dir>/derivatives/grazbids`` output) or cannot be created: in a container
    ``docker run grazbids /bids /out participant`` would need ``/out_work`` in the image's
    read-only (or root-owned) top folder. Its name hashes output_dir so re-runs find their
    cache again.
    """
    sibling = output_dir.with_name(f"{output_dir.name}_work")
    if not _is_within(sibling, bids_dir) and can_create(sibling):
        return sibling
    digest = hashlib.sha1(str(output_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"grazbids_work_{digest}"


def is_temporary_work_dir(work_dir: Path) -> bool:
    return work_dir.parent == Path(tempfile.gettempdir()) and work_dir.name.startswith("grazbids_work_")


def can_create(path: Path) -> bool:
    """Whether ``path`` exists as, or could be created as, a writable folder (nothing is left behind)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=existing):
            return True
    except OSError:
        return False


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup CPU pinning
    except AttributeError:
        return os.cpu_count() or 1


def resolve_plugin(plugin_name: str | None, plugin_file: Path | None) -> tuple[str, dict]:
    """Nipype plugin name and arguments from --plugin and/or --plugin-config."""
    plugin_args: dict = {}
    file_plugin = None
    if plugin_file is not None:
        file_plugin, plugin_args = read_plugin_file(plugin_file.expanduser())
    name = plugin_name or file_plugin or cfg.DEFAULT_PLUGIN
    canonical = {p.lower(): p for p in NIPYPE_PLUGINS}.get(name.lower())
    if canonical is None:
        origin = f" (named in {plugin_file})" if not plugin_name and file_plugin else ""
        raise GrazbidsError(ExitCode.USAGE, f"unknown Nipype plugin {name!r}{origin}; "
                                            f"choose one of {', '.join(NIPYPE_PLUGINS)}")
    return canonical, plugin_args


def read_plugin_file(path: Path) -> tuple[str | None, dict]:
    import yaml

    if not path.is_file():
        raise GrazbidsError(ExitCode.MISSING_INPUT, f"plugin configuration {path} not found")
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise GrazbidsError(ExitCode.USAGE, f"plugin configuration {path} is not valid YAML: {err}") from None
    except OSError as err:
        raise GrazbidsError(ExitCode.IO_ERROR, f"cannot read plugin configuration {path}: {err}") from None
    if not isinstance(content, dict) or not isinstance(content.get("plugin"), str):
        raise GrazbidsError(ExitCode.USAGE,
                            f"plugin configuration {path} must be a mapping with a 'plugin:' name "
                            "and optional 'plugin_args:'")
    args = content.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise GrazbidsError(ExitCode.USAGE, f"plugin configuration {path}: 'plugin_args' must be a mapping")
    return content["plugin"], dict(args)
