"""Participant level: register each T1w to the template, map brain/tissue masks both
ways, check `SkullStripped`, and write BIDS derivatives (optionally run inference).

One sub-workflow per T1w (session/run), all inside the participant's workflow, whose
`outputnode` (`t1w_template`, `brain_mask_template`: lists of derivative paths, one per
T1w) lets the top-level workflow put a barrier before the group level. Crash files of
every node in here go to `<output_dir>/sub-<label>/log/`.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from nipype.pipeline.engine.utils import merge_dict

from ..bids.naming import bids_derivative_name, parse_bids_name
from ..interfaces.derivatives import DerivativesSink
from ..interfaces.masks import BrainMaskOverlap, NativeBrainMask, SkullStrippedCheck
from ..interfaces.registration import ApplyTransforms, RegisterToTemplate
from ..interfaces.reports import ParticipantReport, ReportSection
from ..interfaces.segmentation import TissueSegmentation
from ..interfaces.skullstrip import N4_DESCRIPTION, BrainExtraction, N4BiasCorrection
from ..templates import TemplateFiles, get_template

TISSUES = ("GM", "WM", "CSF")
_PER_T1W_ENTITIES = ("ses", "acq", "ce", "rec", "run")


def _first(inlist):
    """First element of a list output (a single transform file)."""
    return inlist[0] if isinstance(inlist, (list, tuple)) else inlist


def anat_workflow_name(t1w_file: str) -> str:
    """`anat_wf`, or e.g. `anat_ses_1_run_2_wf` when the T1w has those entities."""
    entities, _, _ = parse_bids_name(t1w_file)
    parts = [f"{key}_{entities[key]}" for key in _PER_T1W_ENTITIES if key in entities]
    return re.sub(r"\W", "_", "_".join(["anat", *parts, "wf"]))


def set_crashdump_dir(workflow: pe.Workflow, crashdump_dir: str | Path) -> None:
    """Send crash files of every node in `workflow` (nested included) to `crashdump_dir`.

    Nipype 1.11 merges only the config of the workflow that is *run* into its nodes
    (`node.config = merge_dict(top.config, node.config)`), so a nested workflow's own
    config is ignored; node-level config wins over it, hence set on each node.
    """
    setting = {"execution": {"crashdump_dir": str(crashdump_dir)}}
    workflow.config = merge_dict(workflow.config, setting)  # when run on its own
    for node in workflow._get_all_nodes():
        node.config = merge_dict(node.config or {}, setting)


def init_participant_wf(*, subject: str, t1w_files: list[str], bids_dir, output_dir,
                        template: str, resolution: int, registration: str,
                        omp_nthreads: int, seed: int, model_dir: str | None = None,
                        device: str = "auto", explain: tuple[str, ...] = (), explain_target: str = "predicted",
                        skull_strip: str = "auto", name=None) -> pe.Workflow:
    """Preprocessing (and optional inference) of every T1w of one participant."""
    subject = subject[4:] if subject.startswith("sub-") else subject
    if not t1w_files:
        raise ValueError(f"sub-{subject}: no T1w files to preprocess")
    template_files = get_template(template, resolution)  # fails early, before any work
    workflow = pe.Workflow(name=name or f"sub_{subject}_wf")
    outputnode = pe.Node(niu.IdentityInterface(fields=["t1w_template", "brain_mask_template"]),
                         name="outputnode")
    merge_t1w = pe.Node(niu.Merge(len(t1w_files)), name="merge_t1w_template",
                        run_without_submitting=True)
    merge_mask = pe.Node(niu.Merge(len(t1w_files)), name="merge_brain_mask_template",
                         run_without_submitting=True)
    merge_sections = pe.Node(niu.Merge(len(t1w_files)), name="merge_report_sections",
                             run_without_submitting=True)
    report = pe.Node(ParticipantReport(subject=subject, output_dir=str(output_dir)),
                     name="participant_report", run_without_submitting=True)
    for index, t1w_file in enumerate(sorted(str(f) for f in t1w_files), start=1):
        anat_wf = init_anat_preproc_wf(
            t1w_file=t1w_file, template=template_files, bids_dir=str(bids_dir),
            output_dir=str(output_dir), registration=registration,
            omp_nthreads=omp_nthreads, seed=seed, model_dir=model_dir, device=device,
            explain=tuple(explain), explain_target=explain_target, skull_strip=skull_strip,
            name=anat_workflow_name(t1w_file),
        )
        workflow.connect([
            (anat_wf, merge_t1w, [("outputnode.t1w_template", f"in{index}")]),
            (anat_wf, merge_mask, [("outputnode.brain_mask_template", f"in{index}")]),
            (anat_wf, merge_sections, [("outputnode.report_section", f"in{index}")]),
        ])
    workflow.connect([
        (merge_t1w, outputnode, [("out", "t1w_template")]),
        (merge_mask, outputnode, [("out", "brain_mask_template")]),
        (merge_sections, report, [("out", "sections")]),
    ])
    set_crashdump_dir(workflow, Path(output_dir).absolute() / f"sub-{subject}" / "log")
    return workflow


SKULL_STRIP_MODES = ("auto", "force", "skip")


def needs_skull_strip(t1w_file: str, skull_strip: str) -> bool:
    """`--skull-strip`: force, skip, or auto (only a T1w that is not brain-extracted)."""
    if skull_strip not in SKULL_STRIP_MODES:
        raise ValueError(f"skull_strip must be one of {SKULL_STRIP_MODES}, not {skull_strip!r}")
    if skull_strip != "auto":
        return skull_strip == "force"
    from ..interfaces.skullstrip import looks_brain_extracted

    return not looks_brain_extracted(t1w_file)


def init_anat_preproc_wf(*, t1w_file: str, template: TemplateFiles, bids_dir: str,
                         output_dir: str, registration: str, omp_nthreads: int, seed: int,
                         model_dir: str | None = None, device: str = "auto",
                         explain: tuple[str, ...] = (), explain_target: str = "predicted",
                         skull_strip: str = "auto", name: str = "anat_wf") -> pe.Workflow:
    """Registration, masks, tissue segmentation and derivatives of one T1w.

    A brain-extracted T1w (or `skull_strip="skip"`) is registered as it is, its mask
    being T1w > 0. A head (auto: not brain-extracted; or "force") is bias-corrected
    (N4) and brain-extracted first; the extracted brain and its mask drive the
    registration, the QC and the segmentation (the fMRIPrep way)."""
    strip = needs_skull_strip(t1w_file, skull_strip)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = t1w_file
    outputnode = pe.Node(niu.IdentityInterface(fields=["t1w_template", "brain_mask_template",
                                                       "report_section"]),
                         name="outputnode")
    space, res = template.name, str(template.resolution)

    # brain (registration input) and subject brain mask, native grid
    brainnode = pe.Node(niu.IdentityInterface(fields=["t1w", "brain", "mask", "metadata"]),
                        name="brainnode")
    if strip:
        n4 = pe.Node(N4BiasCorrection(num_threads=omp_nthreads), name="n4_bias_correction",
                     n_procs=omp_nthreads, mem_gb=1.0)
        extract = pe.Node(BrainExtraction(device=device if device in ("cpu", "cuda") else "auto",
                                          num_threads=omp_nthreads, source_file=t1w_file),
                          name="brain_extraction", n_procs=omp_nthreads, mem_gb=3.0)
        workflow.connect([
            (inputnode, n4, [("t1w", "in_file")]),
            (n4, extract, [("out_file", "in_file")]),
            (n4, brainnode, [("out_file", "t1w")]),
            (extract, brainnode, [("out_brain", "brain"), ("out_mask", "mask"),
                                  ("metadata", "metadata")]),
        ])
    else:
        native_mask = pe.Node(NativeBrainMask(), name="native_brain_mask", mem_gb=1.0)
        brainnode.inputs.metadata = {"BrainExtraction": {
            "Method": "none: the input T1w is brain-extracted (mask: T1w > 0, largest "
                      "component, holes filled)"}}
        workflow.connect([
            (inputnode, native_mask, [("t1w", "in_file")]),
            (inputnode, brainnode, [("t1w", "t1w"), ("t1w", "brain")]),
            (native_mask, brainnode, [("out_mask", "mask")]),
        ])

    register = pe.Node(
        RegisterToTemplate(fixed_image=str(template.t1w), fixed_mask=str(template.brain_mask),
                           registration=registration, random_seed=seed),
        name="register", n_procs=omp_nthreads, mem_gb=2.0,
    )
    qc = pe.Node(BrainMaskOverlap(template_mask=str(template.brain_mask)),
                 name="brain_mask_overlap", mem_gb=1.0)
    if strip:
        qc.inputs.mask_description = "subject brain-extraction mask"
    mask_to_native = pe.Node(  # only for the SkullStripped check of brain-extracted inputs
        ApplyTransforms(input_image=str(template.brain_mask), interpolation="nearestNeighbor",
                        output_dtype="uint8", out_file="brain_mask_native.nii.gz"),
        name="brain_mask_to_native", n_procs=omp_nthreads, mem_gb=1.0,
    )
    probsegs_to_native = pe.MapNode(
        ApplyTransforms(interpolation="linear"),
        iterfield=["input_image", "out_file"], name="priors_to_native",
        n_procs=omp_nthreads, mem_gb=1.0,
    )
    probsegs_to_native.inputs.input_image = [str(template.probsegs[t]) for t in TISSUES]
    probsegs_to_native.inputs.out_file = [f"label-{t}_prior_native.nii.gz" for t in TISSUES]
    skullstripped = pe.Node(SkullStrippedCheck(), name="skullstripped_check", mem_gb=1.0)
    segment = pe.Node(TissueSegmentation(num_threads=omp_nthreads), name="tissue_segmentation",
                      n_procs=omp_nthreads, mem_gb=2.0)
    probsegs_to_template = pe.MapNode(
        ApplyTransforms(reference_image=str(template.t1w), interpolation="linear"),
        iterfield=["input_image"], name="probsegs_to_template", n_procs=omp_nthreads, mem_gb=1.0,
    )
    dseg_to_template = pe.Node(
        ApplyTransforms(reference_image=str(template.t1w), interpolation="genericLabel",
                        output_dtype="uint8", out_file="dseg_template.nii.gz"),
        name="dseg_to_template", n_procs=omp_nthreads, mem_gb=1.0,
    )

    # ------------------------------------------------------------------ derivatives
    common = dict(bids_dir=bids_dir, output_dir=output_dir)
    in_template = dict(space=space, res=res, **common)

    def xfm_uri(from_, to):
        return "bids::" + bids_derivative_name(t1w_file, from_=from_, to=to, mode="image",
                                               suffix="xfm", extension=".h5")

    forward_uri, reverse_uri = xfm_uri("T1w", space), xfm_uri(space, "T1w")
    template_note = {"Description": f"{space} template map on the res-{res} grid "
                                    "(the same for every participant)"}
    segmentation_note = {"Description": "the participant's own tissue segmentation (Atropos)"}

    def sink(name_, **kwargs):
        return pe.Node(DerivativesSink(**kwargs), name=name_, run_without_submitting=True)

    ds_t1w = sink("ds_t1w_template", desc="preproc", suffix="T1w", extension=".nii.gz",
                  extra_sources=[forward_uri], **in_template)
    if strip:  # the subject's extracted mask, registered (the QC node's warped mask)
        ds_mask_template = sink("ds_brain_mask_template", desc="brain", suffix="mask",
                                extension=".nii.gz", extra_sources=[forward_uri],
                                metadata={"Description": "the participant's brain extraction "
                                                         "mask registered to the template"},
                                **in_template)
    else:  # unchanged for brain-extracted inputs: the template's mask, labelled as such
        ds_mask_template = sink("ds_brain_mask_template", in_file=str(template.brain_mask),
                                desc="brain", suffix="mask", extension=".nii.gz",
                                metadata=template_note, **in_template)
    ds_probsegs_template = pe.MapNode(
        DerivativesSink(suffix="probseg", extension=".nii.gz", metadata=segmentation_note,
                        extra_sources=[forward_uri], **in_template),
        iterfield=["in_file", "label"], name="ds_probsegs_template",
        run_without_submitting=True,
    )
    ds_probsegs_template.inputs.label = list(TISSUES)
    ds_dseg_template = sink("ds_dseg_template", suffix="dseg", extension=".nii.gz",
                            extra_sources=[forward_uri], **in_template)
    ds_mask_native = sink("ds_brain_mask_native", desc="brain", suffix="mask",
                          extension=".nii.gz", **common)
    ds_probsegs_native = pe.MapNode(
        DerivativesSink(suffix="probseg", extension=".nii.gz", metadata=segmentation_note,
                        **common),
        iterfield=["in_file", "label"], name="ds_probsegs_native",
        run_without_submitting=True,
    )
    ds_probsegs_native.inputs.label = list(TISSUES)
    ds_dseg_native = sink("ds_dseg_native", suffix="dseg", extension=".nii.gz", **common)
    ds_xfm_forward = sink("ds_xfm_forward", from_="T1w", to=space, mode="image",
                          suffix="xfm", extension=".h5", **common)
    ds_xfm_reverse = sink("ds_xfm_reverse", from_=space, to="T1w", mode="image",
                          suffix="xfm", extension=".h5", **common)
    sinks = [ds_t1w, ds_mask_template, ds_probsegs_template, ds_dseg_template, ds_mask_native,
             ds_probsegs_native, ds_dseg_native, ds_xfm_forward, ds_xfm_reverse]

    workflow.connect([
        (brainnode, register, [("brain", "moving_image"), ("mask", "moving_mask")]),
        (brainnode, qc, [("mask", "moving_mask")]),
        (register, qc, [("forward_transforms", "transforms")]),
        (inputnode, probsegs_to_native, [("t1w", "reference_image")]),
        (register, probsegs_to_native, [("reverse_transforms", "transforms")]),
        (brainnode, segment, [("t1w", "in_file"), ("mask", "brain_mask")]),
        (probsegs_to_native, segment, [("output_image", "priors")]),
        (segment, probsegs_to_template, [("probsegs", "input_image")]),
        (register, probsegs_to_template, [("forward_transforms", "transforms")]),
        (segment, dseg_to_template, [("dseg", "input_image")]),
        (register, dseg_to_template, [("forward_transforms", "transforms")]),
        (brainnode, ds_mask_native, [("mask", "in_file"), ("metadata", "extra_metadata")]),
        (segment, ds_probsegs_native, [("probsegs", "in_file")]),
        (segment, ds_dseg_native, [("dseg", "in_file"), ("metadata", "extra_metadata")]),
        (probsegs_to_template, ds_probsegs_template, [("output_image", "in_file")]),
        (dseg_to_template, ds_dseg_template, [("output_image", "in_file")]),
        (segment, ds_dseg_template, [("metadata", "extra_metadata")]),
        (register, ds_xfm_forward, [(("forward_transforms", _first), "in_file"),
                                    ("registration_metadata", "extra_metadata")]),
        (register, ds_xfm_reverse, [(("reverse_transforms", _first), "in_file"),
                                    ("registration_metadata", "extra_metadata")]),
        (ds_t1w, outputnode, [("out_file", "t1w_template")]),
        (ds_mask_template, outputnode, [("out_file", "brain_mask_template")]),
    ])
    if strip:
        # the bias-corrected head, native and template space (SkullStripped: false)
        head_to_template = pe.Node(
            ApplyTransforms(reference_image=str(template.t1w), interpolation="linear",
                            out_file="t1w_preproc_template.nii.gz"),
            name="head_to_template", n_procs=omp_nthreads, mem_gb=1.0)
        qc_meta = pe.Node(niu.Function(function=_merge_dicts, input_names=["a", "b"],
                                       output_names=["out"]), name="preproc_metadata",
                          run_without_submitting=True)
        ds_t1w_native = sink("ds_t1w_native", desc="preproc", suffix="T1w", extension=".nii.gz",
                             skull_stripped=False,
                             metadata={"BiasFieldCorrection": N4_DESCRIPTION}, **common)
        ds_t1w.inputs.skull_stripped = False
        sinks.append(ds_t1w_native)
        workflow.connect([
            (brainnode, head_to_template, [("t1w", "input_image")]),
            (register, head_to_template, [("forward_transforms", "transforms")]),
            (head_to_template, ds_t1w, [("output_image", "in_file")]),
            (qc, qc_meta, [("metadata", "a")]),
            (brainnode, qc_meta, [("metadata", "b")]),
            (qc_meta, ds_t1w, [("out", "extra_metadata")]),
            (brainnode, ds_t1w_native, [("t1w", "in_file"), ("metadata", "extra_metadata")]),
            (qc, ds_mask_template, [("warped_mask", "in_file")]),
        ])
        ds_t1w.inputs.metadata = {"BiasFieldCorrection": N4_DESCRIPTION}
    else:
        # SkullStripped of a brain-extracted input, checked against the registered template
        workflow.connect([
            (inputnode, mask_to_native, [("t1w", "reference_image")]),
            (register, mask_to_native, [("reverse_transforms", "transforms")]),
            (inputnode, skullstripped, [("t1w", "in_file")]),
            (mask_to_native, skullstripped, [("output_image", "brain_mask")]),
            (register, ds_t1w, [("warped_image", "in_file")]),
            (skullstripped, ds_t1w, [("skull_stripped", "skull_stripped")]),
            (qc, ds_t1w, [("metadata", "extra_metadata")]),
        ])
    for ds in sinks:
        workflow.connect(inputnode, "t1w", ds, "source_file")

    # the report section reads the written derivatives, after every sink (Merge: barrier)
    section = pe.Node(ReportSection(output_dir=output_dir), name="report_section", mem_gb=1.0)
    inference_sinks = ("ds_heatmap_template", "ds_heatmap_native", "ds_predictions") if model_dir else ()
    if model_dir:
        from .inference import counterfactual_sink_names, explanation_sink_names  # late: optional, heavy (torch)

        inference_sinks += tuple(name for method in explain for name in explanation_sink_names(method))
        inference_sinks += counterfactual_sink_names(model_dir)
    written = pe.Node(niu.Merge(len(sinks) + len(inference_sinks), ravel_inputs=True),
                      name="merge_derivatives", run_without_submitting=True)
    for index, ds in enumerate(sinks, start=1):
        workflow.connect(ds, "out_file", written, f"in{index}")
    workflow.connect([
        (inputnode, section, [("t1w", "source_file"), ("t1w", "t1w_native")]),
        (ds_t1w, section, [("out_file", "t1w_template"), ("out_meta", "t1w_sidecar")]),
        (ds_mask_template, section, [("out_file", "brain_mask_template")]),
        (ds_probsegs_template, section, [("out_file", "probsegs_template")]),
        (ds_xfm_forward, section, [("out_meta", "xfm_sidecar")]),
        (ds_mask_native, section, [("out_file", "brain_mask_native")]),
        (ds_dseg_native, section, [("out_file", "dseg_native")]),
        (qc, section, [("warped_mask", "subject_mask_template")]),
        (written, section, [("out", "derivatives")]),
        (section, outputnode, [("out_fragment", "report_section")]),
    ])
    if strip:
        section.inputs.template_mask = str(template.brain_mask)
    if model_dir:
        inference_wf = _add_inference(workflow, inputnode, register, ds_t1w, ds_mask_template,
                                      template=template, model_dir=model_dir, device=device,
                                      bids_dir=bids_dir, output_dir=output_dir, explain=explain,
                                      explain_target=explain_target)
        for index, name in enumerate(inference_sinks, start=len(sinks) + 1):
            workflow.connect(inference_wf, f"{name}.out_file", written, f"in{index}")
        workflow.connect([(inference_wf, section, [("ds_heatmap_template.out_file", "heatmap_template"),
                                                   ("ds_predictions.out_file", "predictions")])])
    return workflow


def _merge_dicts(a, b):
    """Two sidecar fragments as one (Nipype Function: self-contained)."""
    return {**(a or {}), **(b or {})}


def _add_inference(workflow, inputnode, register, ds_t1w, ds_mask_template, *, template,
                   model_dir, device, bids_dir, output_dir, explain=(), explain_target="predicted") -> pe.Workflow:
    """The lead's inference sub-workflow, fed with this T1w's derivatives."""
    from .inference import init_inference_wf  # late: optional, heavy (torch)

    kwargs = dict(model_dir=str(model_dir), device=device, bids_dir=bids_dir,
                  output_dir=output_dir, name="inference_wf")
    accepted = inspect.signature(init_inference_wf).parameters
    if "template" in accepted:
        kwargs["template"] = template.name
    if "resolution" in accepted:
        kwargs["resolution"] = template.resolution
    if explain:
        kwargs.update(explain=tuple(explain), explain_target=explain_target)
    inference_wf = init_inference_wf(**kwargs)
    workflow.connect([
        (ds_t1w, inference_wf, [("out_file", "inputnode.t1w_template")]),
        (ds_mask_template, inference_wf, [("out_file", "inputnode.brain_mask_template")]),
        (register, inference_wf, [("reverse_transforms", "inputnode.reverse_transforms")]),
        (inputnode, inference_wf, [("t1w", "inputnode.t1w_native"),
                                   ("t1w", "inputnode.source_file")]),
    ])
    return inference_wf
