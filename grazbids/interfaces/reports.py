"""Nipype interfaces that write the HTML reports (rendering lives in grazbids.reports).

`ReportSection` renders one T1w's section from its written derivatives (cached by Nipype
like any node); `ParticipantReport` joins a participant's sections into
``output_dir/sub-<label>.html``; `GroupReport` writes ``output_dir/group/report.html``
after group training. Report writers always run, so a deleted report is restored.
"""
from __future__ import annotations

import re
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface, TraitedSpec, isdefined, traits,
)

_TISSUE = re.compile(r"_label-([a-zA-Z0-9]+)_probseg\.nii(\.gz)?$")


def _optional(value):
    return value if isdefined(value) and value else None


class _ReportSectionInputSpec(BaseInterfaceInputSpec):
    source_file = traits.Str(mandatory=True, desc="raw T1w (section title and anchor)")
    output_dir = traits.Str(mandatory=True, desc="derivatives folder (links are relative to it)")
    t1w_template = File(exists=True, mandatory=True, desc="written template-space T1w")
    t1w_sidecar = File(exists=True, desc="its JSON sidecar (template, resolution, Dice)")
    brain_mask_template = File(exists=True, mandatory=True, desc="written template brain mask")
    probsegs_template = InputMultiObject(File(exists=True), desc="written label-<tissue> probsegs")
    subject_mask_template = File(exists=True, desc="subject brain mask registered (QC node)")
    xfm_sidecar = File(exists=True, desc="sidecar of the forward transform (registration)")
    template_mask = File(exists=True, desc="the template's brain mask, when brain_mask_template "
                                           "is the participant's own")
    t1w_native = File(exists=True, desc="raw T1w (extraction outline is drawn on it)")
    brain_mask_native = File(exists=True, desc="written native brain mask")
    dseg_native = File(exists=True, desc="written native tissue segmentation (dseg)")
    heatmap_template = File(exists=True, desc="written template-space z+ heat map")
    predictions = File(exists=True, desc="written predictions TSV")
    derivatives = InputMultiObject(traits.Str, desc="every derivative of this T1w (listed, and "
                                                    "a barrier: the report follows all sinks)")


class _ReportSectionOutputSpec(TraitedSpec):
    out_fragment = File(exists=True, desc="HTML fragment of this T1w")


class ReportSection(SimpleInterface):
    """Figures and tables of one T1w, as an HTML fragment."""

    input_spec = _ReportSectionInputSpec
    output_spec = _ReportSectionOutputSpec

    def _run_interface(self, runtime):
        from ..reports import T1wOutputs, render_t1w_section
        from ..reports.counterfactual import counterfactual_maps
        from ..reports.participant import explanation_maps

        inputs = self.inputs
        derivatives = list(inputs.derivatives) if isdefined(inputs.derivatives) else []
        probsegs = {}
        for path in inputs.probsegs_template if isdefined(inputs.probsegs_template) else []:
            match = _TISSUE.search(Path(path).name)
            if not match:
                raise ValueError(f"{path}: no label-<tissue> entity in a probseg name")
            probsegs[match.group(1)] = path
        outputs = T1wOutputs(
            source_file=inputs.source_file, t1w=inputs.t1w_template, brain_mask=inputs.brain_mask_template,
            probsegs=probsegs, subject_mask=_optional(inputs.subject_mask_template),
            t1w_sidecar=_optional(inputs.t1w_sidecar), xfm_sidecar=_optional(inputs.xfm_sidecar),
            template_mask=_optional(inputs.template_mask), t1w_native=_optional(inputs.t1w_native),
            brain_mask_native=_optional(inputs.brain_mask_native),
            dseg_native=_optional(inputs.dseg_native),
            heatmap=_optional(inputs.heatmap_template), predictions=_optional(inputs.predictions),
            derivatives=derivatives,
            # the --explain maps and counterfactual outputs are among the written derivatives
            # (their sinks feed the barrier)
            explanations=explanation_maps(inputs.t1w_template, derivatives),
            counterfactuals=counterfactual_maps(inputs.t1w_template, derivatives),
        )
        out = Path(runtime.cwd) / "report_section.html"
        out.write_text(render_t1w_section(outputs, inputs.output_dir))
        self._results["out_fragment"] = str(out)
        return runtime


class _ParticipantReportInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True, desc="participant label")
    output_dir = traits.Str(mandatory=True, desc="derivatives folder")
    sections = InputMultiObject(File(exists=True), mandatory=True, desc="T1w sections, in order")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the written report")


class ParticipantReport(SimpleInterface):
    """``output_dir/sub-<label>.html`` from the sections of every T1w."""

    input_spec = _ParticipantReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from ..reports import write_participant_report

        sections = [Path(p).read_text() for p in self.inputs.sections]
        path = write_participant_report(self.inputs.subject, sections, self.inputs.output_dir)
        self._results["out_report"] = str(path)
        return runtime


class _GroupReportInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="derivatives folder with group/mode-*")
    ready = traits.Any(desc="barrier: connect the training output")


class GroupReport(SimpleInterface):
    """``output_dir/group/report.html`` from the group training outputs."""

    input_spec = _GroupReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from ..reports import write_group_report

        self._results["out_report"] = str(write_group_report(self.inputs.output_dir))
        return runtime
