"""Participant-level inference: predictions and z+ heat maps with a trained model bundle."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import DerivativesSink
from ..explain.targets import method_desc
from ..interfaces.explain import ExplainMap
from ..interfaces.model import PredictAndExplain
from ..interfaces.registration import ApplyTransforms


def init_inference_wf(*, model_dir, device, bids_dir, output_dir, template: str, resolution: int,
                      explain: tuple[str, ...] = (), explain_target: str = "predicted",
                      name="inference_wf") -> pe.Workflow:
    """Predict the class of one T1w and write its heat map in template and native space.

    ``explain``: further grazbids.explain methods, each written like the z+ map with
    ``desc-<method>`` (``explain_target``: 'predicted', 'softmax' or a class name).

    ``inputnode``: ``t1w_template``, ``brain_mask_template`` (template grid),
    ``reverse_transforms`` (template -> T1w), ``t1w_native`` (reference grid of the
    native map) and ``source_file`` (the raw T1w, for names and provenance).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["t1w_template", "brain_mask_template", "reverse_transforms", "t1w_native", "source_file"]),
        name="inputnode",
    )
    predict = pe.Node(PredictAndExplain(model_dir=str(model_dir), device=device), name="predict")
    to_native = pe.Node(ApplyTransforms(interpolation="linear"), name="heatmap_to_native")
    common = dict(bids_dir=str(bids_dir), output_dir=str(output_dir))
    sink_template = pe.Node(
        DerivativesSink(space=template, res=str(resolution), desc="zplus", suffix="heatmap", extension=".nii.gz", **common),
        name="ds_heatmap_template", run_without_submitting=True,
    )
    sink_native = pe.Node(
        DerivativesSink(desc="zplus", suffix="heatmap", extension=".nii.gz", **common),
        name="ds_heatmap_native", run_without_submitting=True,
    )
    sink_predictions = pe.Node(
        DerivativesSink(desc="grazplus", suffix="predictions", extension=".tsv", **common),
        name="ds_predictions", run_without_submitting=True,
    )
    workflow.connect([
        (inputnode, predict, [("t1w_template", "t1w_template"), ("brain_mask_template", "brain_mask_template")]),
        (predict, to_native, [("heatmap", "input_image")]),
        (inputnode, to_native, [("t1w_native", "reference_image"), ("reverse_transforms", "transforms")]),
        (predict, sink_template, [("heatmap", "in_file"), ("heatmap_metadata", "extra_metadata")]),
        (to_native, sink_native, [("output_image", "in_file")]),
        (predict, sink_native, [("heatmap_metadata", "extra_metadata")]),
        (predict, sink_predictions, [("predictions", "in_file"), ("predictions_metadata", "extra_metadata")]),
        (inputnode, sink_template, [("source_file", "source_file")]),
        (inputnode, sink_native, [("source_file", "source_file")]),
        (inputnode, sink_predictions, [("source_file", "source_file")]),
    ])
    for method in explain:
        _add_explanation(workflow, inputnode, method, explain_target, model_dir=model_dir, device=device,
                         template=template, resolution=resolution, common=common)
    from ..counterfactual.bundle import has_simulator

    if has_simulator(model_dir):  # the bundle folder holds a counterfactual simulator
        _add_counterfactual(workflow, inputnode, model_dir=model_dir, device=device, template=template,
                            resolution=resolution, common=common)
    return workflow


def counterfactual_sink_name(direction: str, suffix: str, native: bool = False) -> str:
    return f"ds_{direction}_{suffix}{'_native' if native else ''}"


def counterfactual_sink_names(model_dir) -> tuple[str, ...]:
    """Names of the counterfactual sinks (none when the bundle holds no simulator): the
    participant report waits for them."""
    from ..counterfactual.bundle import has_simulator
    from ..interfaces.counterfactual import DIRECTIONS, KINDS

    if not has_simulator(model_dir):
        return ()
    return tuple(counterfactual_sink_name(d, k) for d in DIRECTIONS for k in KINDS) + \
        tuple(counterfactual_sink_name(d, "logjacobian", native=True) for d in DIRECTIONS)


def _add_counterfactual(workflow, inputnode, *, model_dir, device, template, resolution, common: dict) -> None:
    """Simulated T1w, displacement and log-Jacobian (template space) per direction, and the
    log-Jacobian in native space; the probabilities before/after go into every sidecar."""
    from ..interfaces.counterfactual import DIRECTIONS, ParticipantCounterfactual

    node = pe.Node(ParticipantCounterfactual(model_dir=str(model_dir), device=device), name="counterfactual",
                   mem_gb=4.0)
    workflow.connect([(inputnode, node, [("t1w_template", "t1w_template"),
                                         ("brain_mask_template", "brain_mask_template")])])
    for direction in DIRECTIONS:
        to_native = pe.Node(ApplyTransforms(interpolation="linear"), name=f"{direction}_logjacobian_to_native")
        workflow.connect([(node, to_native, [(f"{direction}_logjacobian", "input_image")]),
                          (inputnode, to_native, [("t1w_native", "reference_image"),
                                                  ("reverse_transforms", "transforms")])])
        outputs = [(f"{direction}_T1w", dict(space=template, res=str(resolution), suffix="T1w")),
                   (f"{direction}_displacement", dict(space=template, res=str(resolution), suffix="displacement")),
                   (f"{direction}_logjacobian", dict(space=template, res=str(resolution), suffix="logjacobian")),
                   (None, dict(suffix="logjacobian"))]
        for field, entities in outputs:
            sink = pe.Node(DerivativesSink(desc=direction, extension=".nii.gz", **entities, **common),
                           name=counterfactual_sink_name(direction, entities["suffix"], native=not field),
                           run_without_submitting=True)
            source = (node, field) if field else (to_native, "output_image")
            workflow.connect([(source[0], sink, [(source[1], "in_file")]),
                              (node, sink, [(f"{direction}_{'t1w_' if field and field.endswith('T1w') else ''}metadata",
                                             "extra_metadata")]),
                              (inputnode, sink, [("source_file", "source_file")])])


def explanation_sink_names(method: str) -> tuple[str, str]:
    """Names of the template- and native-space sinks of one method's map."""
    return f"ds_{method}_template", f"ds_{method}_native"


def _add_explanation(workflow, inputnode, method: str, target: str, *, model_dir, device, template, resolution,
                     common: dict) -> None:
    """One explanation node, its warp to native space and two derivative sinks."""
    node = pe.Node(ExplainMap(model_dir=str(model_dir), method=method, target=target, device=device),
                   name=f"explain_{method}", mem_gb=4.0)
    to_native = pe.Node(ApplyTransforms(interpolation="linear"), name=f"{method}_to_native")
    name_template, name_native = explanation_sink_names(method)
    desc = method_desc(method)
    sink_template = pe.Node(DerivativesSink(space=template, res=str(resolution), desc=desc, suffix="heatmap",
                                            extension=".nii.gz", **common),
                            name=name_template, run_without_submitting=True)
    sink_native = pe.Node(DerivativesSink(desc=desc, suffix="heatmap", extension=".nii.gz", **common),
                          name=name_native, run_without_submitting=True)
    workflow.connect([
        (inputnode, node, [("t1w_template", "t1w_template"), ("brain_mask_template", "brain_mask_template")]),
        (node, to_native, [("heatmap", "input_image")]),
        (inputnode, to_native, [("t1w_native", "reference_image"), ("reverse_transforms", "transforms")]),
        (node, sink_template, [("heatmap", "in_file"), ("heatmap_metadata", "extra_metadata")]),
        (to_native, sink_native, [("output_image", "in_file")]),
        (node, sink_native, [("heatmap_metadata", "extra_metadata")]),
        (inputnode, sink_template, [("source_file", "source_file")]),
        (inputnode, sink_native, [("source_file", "source_file")]),
    ])
