"""Group-level workflow: one training node over all participants' preprocessed outputs."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.featurevis import GroupFeatureVisualisation
from ..interfaces.model import GroupTraining
from ..interfaces.reports import GroupReport


def init_group_wf(
    *, bids_dir, output_dir, participants: list[str], target_column: str, modes: list[str], cv_folds: int,
    epochs: int, seed: int, device: str, template: str, resolution: int, checkpoint_dir: str | None = None,
    training_options: dict | None = None, guidance_mask: str | None = None, architecture: str = "grazplus",
    explain: tuple[str, ...] = (), explain_target: str = "predicted", atlas: str | None = None,
    feature_visualisation: int = 0, name: str = "group_wf",
) -> pe.Workflow:
    """``inputnode.ready`` is a barrier: connect the participant outputs so training waits.

    ``checkpoint_dir`` (default: inside the node's folder) keeps the training checkpoints
    outside Nipype's node folder, which Nipype empties when it reruns an unfinished node:
    there, an interrupted training resumes instead of starting over.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["ready"]), name="inputnode")
    train = pe.Node(
        GroupTraining(
            bids_dir=str(bids_dir), output_dir=str(output_dir), participants=list(participants),
            target_column=target_column, modes=list(modes), cv_folds=cv_folds, epochs=epochs, seed=seed,
            training_options=dict(training_options or {}),
            **({"guidance_mask": guidance_mask} if guidance_mask else {}),
            architecture=architecture,
            **({"explain": list(explain), "explain_target": explain_target} if explain else {}),
            **({"atlas": str(atlas)} if atlas else {}),
            device=device, template=template, resolution=resolution,
            **({"checkpoint_dir": checkpoint_dir} if checkpoint_dir else {}),
        ),
        name="train",
    )
    workflow.connect(inputnode, "ready", train, "ready")
    # group/report.html, from the files the training wrote
    report = pe.Node(GroupReport(output_dir=str(output_dir)), name="report", mem_gb=1.0)
    if feature_visualisation:  # gradient-ascent steps per class (0: none)
        featurevis = pe.Node(GroupFeatureVisualisation(iterations=feature_visualisation, device=device),
                             name="feature_visualisation", mem_gb=4.0)
        workflow.connect(train, "model_dirs", featurevis, "model_dirs")
        workflow.connect(featurevis, "figures", report, "ready")  # the report shows them
    else:
        workflow.connect(train, "summary", report, "ready")
    return workflow
