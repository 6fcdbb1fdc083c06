"""Nipype interface: one post-hoc explanation map (grazbids.explain) of one image."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import BaseInterface, BaseInterfaceInputSpec, File, TraitedSpec, traits

from ..explain.targets import resolve_target


class _ExplainInputSpec(BaseInterfaceInputSpec):
    t1w_template = File(exists=True, mandatory=True, desc="T1w on the template grid")
    brain_mask_template = File(exists=True, mandatory=True, desc="brain mask on the template grid")
    model_dir = traits.Directory(exists=True, mandatory=True, desc="model bundle folder")
    method = traits.Str(mandatory=True, desc="a grazbids.explain.METHODS name")
    target = traits.Str("predicted", usedefault=True, desc="'predicted', 'softmax' (LRP) or a class name")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)


class _ExplainOutputSpec(TraitedSpec):
    heatmap = File(exists=True, desc="explanation map on the template grid")
    heatmap_metadata = traits.Dict(desc="sidecar fields: method, parameters, class explained, model")


class ExplainMap(BaseInterface):
    """The map of one explanation method for the model's decision on one image."""

    input_spec = _ExplainInputSpec
    output_spec = _ExplainOutputSpec

    def _run_interface(self, runtime):
        import torch

        from ..engine import load_bundle
        from ..engine.device import resolve_device
        from ..explain import describe, explain
        from ..engine.inference import input_tensor, load_input

        inputs = self.inputs
        device = resolve_device(inputs.device)
        model, card = load_bundle(inputs.model_dir, device=device)
        target = resolve_target(inputs.target, list(card["classes"]))
        data, mask, affine = load_input(inputs.t1w_template, inputs.brain_mask_template, card)
        x = input_tensor(data, mask, card, device)
        with torch.no_grad():
            predicted = int(model(x).argmax(1))
        heatmap = explain(model, x, inputs.method, target=target)[0, 0].cpu().numpy()
        out = Path(runtime.cwd) / "heatmap.nii.gz"
        nb.save(nb.Nifti1Image(heatmap.astype(np.float32), affine), str(out))
        explained = {"predicted": f"predicted class ({card['classes'][predicted]!r} for this image)",
                     "softmax": "softmax vector (all classes, each weighted by its probability)"}
        description = describe(inputs.method, target=None)
        self._heatmap = str(out)
        self._metadata = {
            "Description": f"{inputs.method} explanation map of the model's decision",
            "Method": description["summary"],
            "MethodName": inputs.method,
            "MethodParameters": description["parameters"],
            "ExplainedClass": explained.get(inputs.target, inputs.target),
            "Model": os.path.abspath(inputs.model_dir),
            "ModelTrainingMode": card["mode"],
            "ModelClasses": card["classes"],
            "ModelTargetColumn": card["target_column"],
            "Units": "arbitrary (relevance or attribution; signed for gradient methods)",
        }
        return runtime

    def _list_outputs(self):
        return {"heatmap": self._heatmap, "heatmap_metadata": self._metadata}
