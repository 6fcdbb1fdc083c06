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


class PredictAndExplain(BaseInterface):
    """Class probabilities and the Graz+ z+ heat map (from the softmax vector) of one image."""

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        from ..engine import read_card
        from ..inference import predict

        card = read_card(self.inputs.model_dir)
        result = predict(self.inputs.model_dir, self.inputs.t1w_template, self.inputs.brain_mask_template, self.inputs.device)
        cwd = Path(runtime.cwd)
        nb.save(nb.Nifti1Image(result.heatmap.astype(np.float32), result.affine), str(cwd / "heatmap.nii.gz"))
        columns = ["predicted_label", *[f"probability_{c}" for c in result.classes]]
        values = [result.predicted, *[f"{p:.6f}" for p in result.probabilities]]
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
            },
        }
        return runtime

    def _list_outputs(self):
        return self._results


class _GroupTrainingInputSpec(BaseInterfaceInputSpec):
    bids_dir = traits.Directory(exists=True, mandatory=True)
    output_dir = traits.Directory(exists=True, mandatory=True)
    participants = traits.List(traits.Str, mandatory=True)
    target_column = traits.Str(mandatory=True)
    modes = traits.List(traits.Enum("plain", "masked", "grazplus"), mandatory=True)
    cv_folds = traits.Int(5, usedefault=True)
    epochs = traits.Int(60, usedefault=True)
    training_options = traits.Dict(traits.Str, traits.Either(traits.Int, traits.Float), usedefault=True,
                                   desc="other grazbids.engine.TrainSettings fields (learning_rate, ...)")
    seed = traits.Int(42, usedefault=True)
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    template = traits.Str(mandatory=True)
    resolution = traits.Int(mandatory=True)
    ready = InputMultiObject(traits.Any, desc="barrier: participant preprocessing outputs")
    architecture = traits.Enum("grazplus", "kondrateva", usedefault=True, desc="network to train")
    guidance_mask = traits.Str(desc="relevance-term mask, e.g. desc-lesion (default: the brain mask)")
    explain = traits.List(traits.Str, desc="grazbids.explain methods summarised out of fold besides z+")
    explain_target = traits.Str("predicted", usedefault=True, desc="class the explain maps explain")
    atlas = File(exists=True, desc="label image in the template space: relevance per region")
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
        from ..group_training import run_group_training

        inputs = self.inputs
        summaries = run_group_training(
            bids_dir=inputs.bids_dir, output_dir=inputs.output_dir, participants=list(inputs.participants),
            target_column=inputs.target_column, modes=list(inputs.modes), cv_folds=inputs.cv_folds,
            epochs=inputs.epochs, training_options=dict(inputs.training_options), seed=inputs.seed,
            guidance_mask=inputs.guidance_mask if isdefined(inputs.guidance_mask) else None,
            architecture=inputs.architecture, device=inputs.device, template=inputs.template,
            explain=tuple(inputs.explain) if isdefined(inputs.explain) else (), explain_target=inputs.explain_target,
            atlas=inputs.atlas if isdefined(inputs.atlas) else None,
            resolution=inputs.resolution,
            work_dir=Path(inputs.checkpoint_dir) if isdefined(inputs.checkpoint_dir) else Path(runtime.cwd) / "training",
        )
        summary = Path(runtime.cwd) / "summary.json"
        summary.write_text(json.dumps(summaries, indent=2))
        self._results = {
            "summary": str(summary),
            "model_dirs": [str(Path(inputs.output_dir) / "group" / f"mode-{m}" / "model") for m in inputs.modes],
        }
        return runtime

    def _list_outputs(self):
        return self._results
