"""Group-level workflow: one training node over all participants' preprocessed outputs,
then the feature visualisation (optional) and the group report."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..config import GROUP_WORKFLOW_NAME, GroupSettings
from ..interfaces.counterfactual import GroupCounterfactual
from ..interfaces.featurevis import GroupFeatureVisualisation
from ..interfaces.model import GroupTraining
from ..interfaces.reports import GroupReport


def init_group_wf(settings: GroupSettings, *, checkpoint_dir: str | None = None,
                  name: str = GROUP_WORKFLOW_NAME) -> pe.Workflow:
    """``inputnode.ready`` is a barrier: connect the participant outputs so training waits.

    ``checkpoint_dir`` (default: inside the node's folder) keeps the training checkpoints
    outside Nipype's node folder, which Nipype empties when it reruns an unfinished node:
    there, an interrupted training resumes instead of starting over.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["ready"]), name="inputnode")
    train = pe.Node(GroupTraining(settings=settings.to_dict()), name="train")
    if checkpoint_dir:
        train.inputs.checkpoint_dir = str(checkpoint_dir)
    workflow.connect(inputnode, "ready", train, "ready")
    # group/report.html, from the files the training wrote
    report = pe.Node(GroupReport(output_dir=str(settings.output_dir)), name="report", mem_gb=1.0)
    ready = []  # what the report waits for (it shows what these nodes write)
    if settings.feature_visualisation:  # gradient-ascent steps per class (0: none)
        featurevis = pe.Node(GroupFeatureVisualisation(iterations=settings.feature_visualisation,
                                                       device=settings.device),
                             name="feature_visualisation", mem_gb=4.0)
        workflow.connect(train, "model_dirs", featurevis, "model_dirs")
        ready.append((featurevis, "figures"))
    if settings.counterfactual:  # simulator epochs (0: none)
        counterfactual = pe.Node(GroupCounterfactual(settings=settings.to_dict()), name="counterfactual", mem_gb=4.0)
        if checkpoint_dir:
            counterfactual.inputs.checkpoint_dir = str(checkpoint_dir)
        workflow.connect(train, "model_dirs", counterfactual, "model_dirs")
        ready.append((counterfactual, "summaries"))
    if not ready:
        ready.append((train, "summary"))
    barrier = pe.Node(niu.Merge(len(ready)), name="report_ready", run_without_submitting=True)
    for index, (node, field) in enumerate(ready, start=1):
        workflow.connect(node, field, barrier, f"in{index}")
    workflow.connect(barrier, "out", report, "ready")
    return workflow
