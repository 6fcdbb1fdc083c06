"""The single Nipype workflow of a grazbids run.

Participant level: one participant sub-workflow per selected participant, side by side
(independent, so one crash does not stop the others). Group level: participant
preprocessing for those whose template-space T1w is not yet in output_dir, then the
group workflow, which waits for all of them through a barrier (Merge) node.

Sub-workflows are named ``sub_<label>_wf`` and ``group_wf``; :func:`node_owner` maps any
node back to its participant by that name, which is how failures are attributed.
"""
from __future__ import annotations

from pathlib import Path

import re

from ..config import GROUP_WORKFLOW_NAME, WORKFLOW_NAME, GroupSettings, RunConfig, participant_workflow_name
from ..bids.patterns import find_preprocessed_t1w

GROUP_OWNER = "group"
BARRIER_NAME = "preprocessing_done"
_PARTICIPANT_WF = re.compile(r"^sub_([A-Za-z0-9]+)_wf$")


def load_participant_builder():
    """``init_participant_wf``; imported late so the CLI starts fast (and tests can swap it)."""
    from .participant import init_participant_wf

    return init_participant_wf


def load_group_builder():
    from .group import init_group_wf

    return init_group_wf


def node_owner(fullname: str) -> str | None:
    """'sub-<label>' or 'group' for a node's hierarchical name; None for top-level nodes."""
    for part in fullname.split("."):
        match = _PARTICIPANT_WF.match(part)
        if match:
            return f"sub-{match.group(1)}"
        if part == GROUP_WORKFLOW_NAME:
            return GROUP_OWNER
    return None


def participants_to_preprocess(config: RunConfig) -> list[str]:
    """Participant level: every selected participant. Group level: those in the group
    analysis whose preprocessed T1w is missing from output_dir (earlier runs are reused)."""
    if not config.is_group_level:
        return sorted(config.t1w_files)
    missing = []
    for label in group_participants(config):
        if find_preprocessed_t1w(config.output_dir, label, config.template, config.resolution):
            continue
        if label not in config.t1w_files:
            raise ValueError(f"sub-{label} has neither a preprocessed T1w in {config.output_dir} "
                             "nor a checked T1w input to preprocess")
        missing.append(label)
    return missing


def group_participants(config: RunConfig) -> list[str]:
    return list(config.group_participants or sorted(config.t1w_files))


def init_grazbids_wf(config: RunConfig):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name=WORKFLOW_NAME, base_dir=str(config.work_dir))
    init_participant_wf = load_participant_builder()
    participant_wfs = []
    for label in participants_to_preprocess(config):
        participant_wf = init_participant_wf(
            subject=label,
            t1w_files=[str(path) for path in config.t1w_files[label]],
            bids_dir=str(config.bids_dir),
            output_dir=str(config.output_dir),
            template=config.template,
            resolution=config.resolution,
            registration=config.registration,
            **({"skull_strip": config.skull_strip} if config.skull_strip != "auto" else {}),
            omp_nthreads=config.omp_nthreads,
            seed=config.random_seed,
            # inference belongs to the participant level only; the group level trains
            model_dir=None if config.is_group_level or config.model_dir is None else str(config.model_dir),
            device=config.device,
            **({"explain": config.explain, "explain_target": config.explain_target} if config.explain else {}),
            name=participant_workflow_name(label),
        )
        participant_wfs.append(participant_wf)
    if participant_wfs:
        workflow.add_nodes(participant_wfs)

    if config.is_group_level:
        _add_group_wf(workflow, config, participant_wfs, niu, pe)
    return workflow


def _add_group_wf(workflow, config: RunConfig, participant_wfs, niu, pe) -> None:
    members = group_participants(config)
    group_wf = load_group_builder()(
        GroupSettings.from_run_config(config, members),
        checkpoint_dir=str(Path(config.work_dir) / "group_training"),
        name=GROUP_WORKFLOW_NAME,
    )
    if participant_wfs:
        # barrier: the group step starts only after every participant's preprocessing
        barrier = pe.Node(niu.Merge(len(participant_wfs)), name=BARRIER_NAME)
        for index, participant_wf in enumerate(participant_wfs, start=1):
            workflow.connect(participant_wf, "outputnode.t1w_template", barrier, f"in{index}")
        workflow.connect(barrier, "out", group_wf, "inputnode.ready")
    else:
        group_wf.inputs.inputnode.ready = [
            str(path)
            for label in members
            for path in find_preprocessed_t1w(config.output_dir, label, config.template, config.resolution)
        ]
        workflow.add_nodes([group_wf])
