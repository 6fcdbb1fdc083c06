"""Every check that runs before any work, in the order a user would want to hear about it.

Nothing here writes into output_dir: a run that stops in preflight leaves no files. The
result is the RunConfig completed with the participants to process and their checked T1w
images; per-participant problems (no T1w, unusable image, no target value) go into the
RunReport instead of stopping the run.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ..config import RunConfig
from ..exitcodes import ExitCode, GrazbidsError
from ..utils.bids_validator import ValidationReport, ValidatorUnavailable, run_validator
from ..utils.dataset import check_output_owner
from ..utils.model_card import check_explain_target, check_model_space
from ..utils.paths import check_writable_folder
from ..bids.participants import check_target
from ..bids.patterns import find_preprocessed_t1w
from ..bids.selection import check_bids_root, load_layout, select_participants
from ..utils.validation import check_t1w_image, voxel_limit
from .summary import RunReport

LOGGER = logging.getLogger("grazbids")
MAX_LISTED_ERRORS = 10


def run_preflight(config: RunConfig, report: RunReport) -> tuple[RunConfig, dict]:
    """Check inputs and outputs; return the completed config and the input's description."""
    source_description = check_bids_root(config.bids_dir)
    check_writable_folder(config.output_dir, "output_dir")
    check_writable_folder(config.work_dir, "work folder")
    check_output_owner(config.output_dir)

    if config.skip_bids_validation:
        LOGGER.warning("BIDS validation skipped (--skip-bids-validation)")
    else:
        validate_dataset(config)

    check_model(config)
    check_template(config)
    check_atlas(config)

    layout = load_layout(config.bids_dir)
    selection = select_participants(layout, config.participant_labels, config.session_labels)
    report.without_t1w = selection.without_t1w
    report.requested_without_t1w = bool(config.participant_labels)
    for label in selection.without_t1w:
        LOGGER.warning("sub-%s has no T1w image%s; skipped", label,
                       f" in session(s) {', '.join(config.session_labels)}" if config.session_labels else "")

    if config.is_group_level:
        return _prepare_group(config, report, selection.t1w_files, selection.without_t1w), source_description

    if not selection.t1w_files:
        raise GrazbidsError(ExitCode.NO_FILES, "no T1w images selected: " + _selection_text(config))
    usable = check_images(selection.t1w_files, report, config.mem_gb)
    if not usable:
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"none of the {len(selection.t1w_files)} selected participant(s) has usable T1w "
                            "data; see the messages above")
    return replace(config, t1w_files=usable), source_description


def _selection_text(config: RunConfig) -> str:
    who = (", ".join(f"sub-{label}" for label in config.participant_labels)
           if config.participant_labels else "all participants")
    sessions = f", sessions {', '.join(config.session_labels)}" if config.session_labels else ""
    return f"{who}{sessions} in {config.bids_dir}"


def validate_dataset(config: RunConfig) -> ValidationReport:
    LOGGER.info("Validating %s with bids-validator-deno", config.bids_dir)
    try:
        result = run_validator(config.bids_dir)
    except ValidatorUnavailable as err:
        raise GrazbidsError(ExitCode.FAILURE, str(err)) from None
    if result.warnings:
        counts = ", ".join(f"{code} x{n}" for code, n in result.warning_counts().items())
        LOGGER.info("BIDS validator: %d warning(s) (%s)", len(result.warnings), counts)
        for issue in result.warnings:
            LOGGER.debug("BIDS validator warning: %s", result.describe(issue))
    if result.errors:
        listed = "\n  ".join(result.describe(issue) for issue in result.errors[:MAX_LISTED_ERRORS])
        more = (f"\n  ... and {len(result.errors) - MAX_LISTED_ERRORS} more"
                if len(result.errors) > MAX_LISTED_ERRORS else "")
        raise GrazbidsError(
            ExitCode.VALIDATION_FAILED,
            f"{config.bids_dir} is not valid BIDS ({len(result.errors)} error(s)):\n  {listed}{more}\n"
            "Fix the dataset, or pass --skip-bids-validation if you know these errors do not "
            "affect grazbids.",
        )
    LOGGER.info("BIDS validation passed")
    return result


def check_model(config: RunConfig) -> None:
    if config.model_dir is None:
        return
    if config.is_group_level:
        LOGGER.warning("--model is used at the participant level only; ignored at the group level")
        return
    check_model_space(config.model_dir, config.template, config.resolution)
    check_explain_target(config.model_dir, config.explain, config.explain_target)
    check_model_files(config.model_dir)


def check_model_files(model_dir) -> None:
    """Card and weights agree and the weights file is complete (66 missing, 65 unusable),
    from the safetensors header alone: no weight is read, nothing large is allocated."""
    from ..engine.bundle import ModelBundleError, ModelBundleMissing, check_bundle

    try:
        check_bundle(model_dir)
    except ModelBundleMissing as err:
        raise GrazbidsError(ExitCode.MISSING_INPUT, f"model bundle: {err}") from None
    except ModelBundleError as err:
        raise GrazbidsError(ExitCode.BAD_DATA, f"model bundle {model_dir} is unusable: {err}") from None


def check_template(config: RunConfig) -> None:
    """Fail before any work when the template is not available locally (no downloads)."""
    try:
        from ..templates import TemplateNotFoundError, get_template
    except ModuleNotFoundError as err:
        if err.name != "grazbids.templates":
            raise
        LOGGER.warning("grazbids.templates is not installed; template %s not checked", config.template)
        return
    try:
        get_template(config.template, config.resolution)
    except TemplateNotFoundError as err:
        raise GrazbidsError(ExitCode.MISSING_INPUT, str(err)) from None


def check_atlas(config: RunConfig) -> None:
    """--atlas (group level): an existing label image that lands on the template grid."""
    if config.atlas is None:
        return
    if not config.is_group_level:
        LOGGER.warning("--atlas is used at the group level only; ignored at the participant level")
        return
    if not config.atlas.is_file():
        raise GrazbidsError(ExitCode.MISSING_INPUT, f"--atlas {config.atlas}: no such file")
    import nibabel as nb

    from ..evaluate.atlas import AtlasError, load_atlas
    from ..templates import get_template
    try:
        load_atlas(config.atlas, nb.load(str(get_template(config.template, config.resolution).t1w)))
    except AtlasError as err:
        raise GrazbidsError(ExitCode.BAD_DATA, str(err)) from None


def check_images(t1w_files: dict, report: RunReport, mem_gb: float | None = None) -> dict:
    """Participants whose T1w images all pass; the others go to report.excluded."""
    usable = {}
    max_voxels = voxel_limit(mem_gb)
    for label, files in t1w_files.items():
        checks = [check_t1w_image(path, max_voxels) for path in files]
        problems = [check.describe() for check in checks if not check.ok]
        for check in checks:
            if check.ok and check.notes:
                LOGGER.warning("sub-%s: %s", label, check.describe())
        if problems:
            report.excluded[label] = problems
            for problem in problems:
                LOGGER.error("sub-%s excluded: %s", label, problem)
        else:
            usable[label] = files
    return usable


def _prepare_group(config: RunConfig, report: RunReport, t1w_files: dict, without_t1w: list) -> RunConfig:
    def preprocessed(label):
        return find_preprocessed_t1w(config.output_dir, label, config.template, config.resolution)

    # a participant without raw T1w can still join when an earlier run preprocessed it
    candidates = sorted(set(t1w_files) | {label for label in without_t1w if preprocessed(label)})
    report.without_t1w = [label for label in without_t1w if label not in candidates]
    if not candidates:
        raise GrazbidsError(ExitCode.NO_FILES,
                            "no T1w images or preprocessed outputs selected: " + _selection_text(config))
    target = check_target(config.bids_dir, config.target_column, candidates, config.cv_folds)
    report.without_target = target.without_value
    members = sorted(target.classes)

    done = [label for label in members if preprocessed(label)]
    report.reused_preprocessing = done
    todo = {label: t1w_files[label] for label in members if label not in done}
    if done:
        LOGGER.info("Reusing the preprocessing of %d participant(s) found in %s", len(done), config.output_dir)
    usable = check_images(todo, report, config.mem_gb)
    members = [label for label in members if label in done or label in usable]
    if not members:
        raise GrazbidsError(ExitCode.BAD_DATA, "no participant with a target value has usable T1w data")
    if len(members) < len(target.classes):
        check_target(config.bids_dir, config.target_column, members, config.cv_folds)  # still trainable?
    return replace(config, t1w_files=usable, group_participants=tuple(members))
