"""Nipype interfaces around the Graz+ engine: inference on one image, group training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterface, BaseInterfaceInputSpec, File, InputMultiObject, TraitedSpec, isdefined, traits,
)


class _PredictInputSpec(BaseInterfaceInputSpec):
    t1w_template = File(exists=True, mandatory=True, desc="T1w on the template grid")
    brain_mask_template = File(exists=True, mandatory=True, desc="brain mask on the template grid")
    model_dir = traits.Directory(exists=True, mandatory=True, desc="model bundle folder")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)


class _PredictOutputSpec(TraitedSpec):
    heatmap = File(exists=True, desc="z+ relevance map on the template grid")
    predictions = File(exists=True, desc="one-row TSV: predicted class and per-class probabilities")
    heatmap_metadata = traits.Dict(desc="sidecar fields for the heat map")
    predictions_metadata = traits.Dict(desc="sidecar (data dictionary) for the predictions TSV")


def _dependence_descriptions(dependence: dict) -> dict:
    fills = {"outside_zero": "everything outside the brain mask is set to 0",
             "outside_mean": "everything outside the brain mask is set to the training cohort's mean image"}
    out = {}
    for region in dependence:
        out[f"prob_change_{region}"] = {"Description": f"change in the probability of the predicted class when "
                                                       f"{fills[region]} (decision dependence; docs/usage.md)"}
        out[f"flip_{region}"] = {"Description": f"1 when the predicted class changes as {fills[region]}",
                                 "Levels": {"0": "same decision", "1": "decision flips"}}
    return out


class PredictAndExplain(BaseInterface):
    """Class probabilities and the Graz+ z+ heat map (from the softmax vector) of one image."""

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        from ..engine import read_card
        from ..engine.inference import predict

        card = read_card(self.inputs.model_dir)
        result = predict(self.inputs.model_dir, self.inputs.t1w_template, self.inputs.brain_mask_template, self.inputs.device)
        cwd = Path(runtime.cwd)
        nb.save(nb.Nifti1Image(result.heatmap.astype(np.float32), result.affine), str(cwd / "heatmap.nii.gz"))
        dependence = [(f"{key}_{region}", value) for region, measured in result.dependence.items()
                      for key, value in (("prob_change", f"{measured['prob_change']:.6f}"), ("flip", str(measured["flip"])))]
        columns = ["predicted_label", *[f"probability_{c}" for c in result.classes], *[k for k, _ in dependence]]
        values = [result.predicted, *[f"{p:.6f}" for p in result.probabilities], *[v for _, v in dependence]]
        (cwd / "predictions.tsv").write_text("\t".join(columns) + "\n" + "\t".join(values) + "\n")
        model_name = os.path.abspath(self.inputs.model_dir)
        self._results = {
            "heatmap": str(cwd / "heatmap.nii.gz"),
            "predictions": str(cwd / "predictions.tsv"),
            "heatmap_metadata": {
                "Description": "Layer-wise relevance propagation heat map of the model's decision",
                "Method": "LRP, deep Taylor z+ rule in every layer (Graz+)",
                "ExplainedClass": "softmax vector (all classes, each weighted by its probability)",
                "Model": model_name,  # the bundle folder used
                "ModelTrainingMode": card["mode"],
                "ModelClasses": card["classes"],
                "ModelTargetColumn": card["target_column"],
                "ModelGrazbidsVersion": card["grazbids_version"],
                "Units": "relevance (the map sums to 1 on the template grid)",
            },
            "predictions_metadata": {
                "predicted_label": {"Description": f"predicted value of {card['target_column']}",
                                    "Levels": {c: c for c in card["classes"]}},
                **{f"probability_{c}": {"Description": f"model probability of {card['target_column']} = {c}"}
                   for c in card["classes"]},
                **_dependence_descriptions(result.dependence),
            },
        }
        return runtime

    def _list_outputs(self):
        return self._results


class _GroupTrainingInputSpec(BaseInterfaceInputSpec):
    settings = traits.Dict(mandatory=True, desc="grazbids.config.GroupSettings.to_dict()")
    ready = InputMultiObject(traits.Any, desc="barrier: participant preprocessing outputs")
    checkpoint_dir = traits.Str(nohash=True, desc="persistent folder for training checkpoints "
                                "(default: the node's folder, which Nipype empties on a rerun)")


class _GroupTrainingOutputSpec(TraitedSpec):
    summary = File(exists=True, desc="JSON with the CV summary of every mode")
    model_dirs = traits.List(traits.Directory(exists=True))


class GroupTraining(BaseInterface):
    """Cross-validated Graz+ training of every requested mode; writes into output_dir/group."""

    input_spec = _GroupTrainingInputSpec
    output_spec = _GroupTrainingOutputSpec

    def _run_interface(self, runtime):
        from ..config import GroupSettings
        from ..group.layout import GroupLayout
        from ..group.training import run_group_training

        settings = GroupSettings.from_dict(self.inputs.settings)
        work_dir = (Path(self.inputs.checkpoint_dir) if isdefined(self.inputs.checkpoint_dir)
                    else Path(runtime.cwd) / "training")
        summaries = run_group_training(settings, work_dir)
        summary = Path(runtime.cwd) / "summary.json"
        summary.write_text(json.dumps(summaries, indent=2))
        layout = GroupLayout(settings.output_dir)
        self._results = {"summary": str(summary),
                         "model_dirs": [str(layout.mode(m).model_dir) for m in settings.modes]}
        return runtime

    def _list_outputs(self):
        return self._results
