"""The settings of one grazbids run, parsed from the command line and checked.

``grazbids.cli.parser.parse_args`` fills the user's choices; the preflight checks
(``grazbids.cli.preflight``) then add the selected, readable inputs (``t1w_files``,
``group_participants``) with :func:`dataclasses.replace`. Nothing downstream re-reads
``sys.argv`` or the environment: the workflow builders get everything from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ANALYSIS_LEVELS = ("participant", "group")
DEFAULT_TEMPLATE = "MNI152NLin2009aSym"  # shipped with grazbids: no TemplateFlow download
RESOLUTIONS = (1, 2)  # TemplateFlow res- index: 1 = 1 mm, 2 = 2 mm
DEFAULT_RESOLUTION = 2
REGISTRATIONS = ("rigid", "affine", "nonlinear")
SKULL_STRIP_MODES = ("auto", "force", "skip")
INPUT_IMAGES = ("brain", "head")  # group level: what the network sees (grazbids.utils.input_image)
DEFAULT_REGISTRATION = "affine"
DEVICES = ("auto", "cpu", "cuda")
MODES = ("plain", "masked", "grazplus")
DEFAULT_MODES = ("grazplus",)
DEFAULT_CV_FOLDS = 5
DEFAULT_EPOCHS = 60  # as in Graz+ (Tinauer et al. 2022)
DEFAULT_SEED = 42  # as in Graz+
DEFAULT_PLUGIN = "MultiProc"
# grazbids.explain.METHODS except zplus (always written with --model); a test keeps them equal
EXPLAIN_METHODS = ("contrastive", "epsilon", "alpha1beta0", "alpha2beta1", "alphabeta", "composite", "gradcam",
                   "guided_backprop", "gradient", "gradient_x_input", "integrated_gradients",
                   "meaningful_perturbation")

WORKFLOW_NAME = "grazbids_wf"
GROUP_WORKFLOW_NAME = "group_wf"


def participant_workflow_name(label: str) -> str:
    """Name of a participant's sub-workflow; failures are traced back to it by this name."""
    return f"sub_{label}_wf"


@dataclass(frozen=True)
class RunConfig:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    # selection as requested on the command line (labels without "sub-"; empty = all)
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    skip_bids_validation: bool = False
    # spatial normalisation
    template: str = DEFAULT_TEMPLATE
    resolution: int = DEFAULT_RESOLUTION
    registration: str = DEFAULT_REGISTRATION
    skull_strip: str = "auto"
    input_image: str = "brain"
    # deep learning
    device: str = "auto"
    model_dir: Path | None = None
    explain: tuple[str, ...] = ()  # further explanation methods (grazbids.explain) with --model
    explain_target: str = "predicted"
    target_column: str | None = None
    modes: tuple[str, ...] = DEFAULT_MODES
    cv_folds: int = DEFAULT_CV_FOLDS
    epochs: int = DEFAULT_EPOCHS
    # optimiser settings; None = the engine's defaults (grazbids.engine.TrainSettings)
    training_options: dict = field(default_factory=dict)
    architecture: str = "grazplus"  # or "kondrateva" (Kondrateva et al.; plain/masked modes only)
    guidance_mask: str | None = None  # e.g. "desc-lesion": relevance-term mask instead of the brain
    atlas: Path | None = None  # group level: label image in the template space (relevance per region)
    feature_visualisation: int = 0  # group level: gradient-ascent steps per class (0: no feature visualisation)
    counterfactual: int = 0  # group level: epochs of a counterfactual simulator per mode (0: none)
    random_seed: int = DEFAULT_SEED
    # execution
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    plugin: str = DEFAULT_PLUGIN
    plugin_args: dict = field(default_factory=dict)
    stop_on_first_crash: bool = False
    verbosity: int = 0
    # filled by the preflight checks: participant label -> its checked T1w images, for
    # every participant whose preprocessing runs in this invocation
    t1w_files: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    # group level only: every participant entering the group analysis (already
    # preprocessed ones and those preprocessed in this run)
    group_participants: tuple[str, ...] = ()

    @property
    def is_group_level(self) -> bool:
        return self.analysis_level == "group"

    @property
    def log_dir(self) -> Path:
        """Dataset-level logs (run summaries, citation text); listed in .bidsignore."""
        return self.output_dir / "logs"


@dataclass(frozen=True)
class GroupSettings:
    """Everything the group level needs, built once from the checked :class:`RunConfig`
    (``from_run_config``) and handed whole to the training node and the torchrun entry
    point. ``to_dict``/``from_dict`` carry it through Nipype (JSON-safe, hashed by Nipype)."""

    bids_dir: Path
    output_dir: Path
    participants: tuple[str, ...]
    target_column: str
    modes: tuple[str, ...] = DEFAULT_MODES
    cv_folds: int = DEFAULT_CV_FOLDS
    epochs: int = DEFAULT_EPOCHS
    seed: int = DEFAULT_SEED
    device: str = "auto"
    template: str = DEFAULT_TEMPLATE
    resolution: int = DEFAULT_RESOLUTION
    # optimiser settings; absent = the engine's defaults (grazbids.engine.TrainSettings)
    training_options: dict = field(default_factory=dict)
    architecture: str = "grazplus"
    guidance_mask: str | None = None
    explain: tuple[str, ...] = ()
    explain_target: str = "predicted"
    atlas: Path | None = None
    feature_visualisation: int = 0
    input_image: str = "brain"
    counterfactual: int = 0  # simulator epochs (0: no counterfactual simulator)

    @classmethod
    def from_run_config(cls, config: RunConfig, participants: tuple[str, ...] | list[str]) -> "GroupSettings":
        return cls(
            bids_dir=Path(config.bids_dir), output_dir=Path(config.output_dir), participants=tuple(participants),
            target_column=config.target_column, modes=tuple(config.modes), cv_folds=config.cv_folds,
            epochs=config.epochs, seed=config.random_seed, device=config.device, template=config.template,
            resolution=config.resolution, training_options=dict(config.training_options),
            architecture=config.architecture, guidance_mask=config.guidance_mask, explain=tuple(config.explain),
            explain_target=config.explain_target, atlas=config.atlas,
            feature_visualisation=config.feature_visualisation, input_image=config.input_image,
            counterfactual=config.counterfactual,
        )

    def to_dict(self) -> dict:
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "GroupSettings":
        values = dict(data)
        for name in ("bids_dir", "output_dir", "atlas"):
            values[name] = Path(values[name]) if values.get(name) is not None else None
        for name in ("participants", "modes", "explain"):
            values[name] = tuple(values[name])
        values["training_options"] = dict(values.get("training_options") or {})
        return cls(**values)
