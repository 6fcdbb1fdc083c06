"""The derivatives a participant sub-workflow will write, read off the workflow graph.

A participant only counts as succeeded when these files exist after the run: a node can
report success while a file it should have written is missing (a full disk while Nipype
itself was writing, a scheduler that died), and the run summary must not say otherwise.
Every ``DerivativesSink`` node (Node or MapNode over ``label``) gives one file and its JSON
sidecar; its source T1w is the ``t1w`` input of the nearest enclosing workflow's inputnode.
"""
from __future__ import annotations

from pathlib import Path


def expected_derivatives(participant_wf) -> list[Path]:
    from nipype.interfaces.base import isdefined
    from nipype.pipeline import engine as pe

    from ..interfaces.derivatives import DerivativesSink

    found: list[Path] = []

    def walk(workflow, source):
        inputnode = workflow.get_node("inputnode")
        t1w = getattr(inputnode.inputs, "t1w", None) if inputnode is not None else None
        if t1w is not None and isdefined(t1w):
            source = t1w
        for node in workflow._graph.nodes():
            if isinstance(node, pe.Workflow):
                walk(node, source)
            elif isinstance(getattr(node, "interface", None), DerivativesSink) and source:
                found.extend(_sink_files(node, source, isdefined))

    walk(participant_wf, None)
    return found


def _sink_files(node, source: str, isdefined) -> list[Path]:
    from ..bids.naming import bids_derivative_name, split_extension

    inputs = node.interface.inputs
    if not isdefined(inputs.extension) or not isdefined(inputs.output_dir):
        return []  # named after a file known only at run time: nothing to compare against
    entities = {key: getattr(inputs, key) for key in ("space", "res", "desc", "label", "from_", "to", "mode")
                if isdefined(getattr(inputs, key))}
    labels = [entities.get("label")]
    if "label" in getattr(node, "iterfield", ()):  # MapNode: one file per label
        labels = list(node.inputs.label) if isdefined(node.inputs.label) else []
    files = []
    for label in labels:
        name = bids_derivative_name(source, suffix=inputs.suffix, extension=inputs.extension,
                                    **{**entities, **({"label": label} if label else {})})
        path = Path(inputs.output_dir) / name
        files += [path, Path(split_extension(path)[0] + ".json")]
    return files
