"""Nipype interface: feature visualisation of every class of the trained models (group level)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, TraitedSpec, traits

LOG = logging.getLogger("grazbids")

# the group report's recipe: jitter and periodic blur against high-frequency patterns
# (Olah et al. 2017; Eitel et al. 2022); every setting goes into the JSON sidecar
GROUP_REGULARISERS = {"jitter": 2, "blur_every": 4, "blur_sigma": 0.5}


class _FeatureVisInputSpec(BaseInterfaceInputSpec):
    model_dirs = traits.List(traits.Directory(exists=True), mandatory=True, desc="model bundles (group/mode-*/model)")
    iterations = traits.Int(200, usedefault=True, desc="gradient-ascent steps per class")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)


class _FeatureVisOutputSpec(TraitedSpec):
    figures = traits.List(traits.File(exists=True), desc="one PNG per model and class")


class GroupFeatureVisualisation(SimpleInterface):
    """``group/mode-<mode>/featurevis/featurevis_class-<class>.nii.gz/.json/.png`` for every
    class of every model: the input that maximises the class logit, on the template grid."""

    input_spec = _FeatureVisInputSpec
    output_spec = _FeatureVisOutputSpec

    def _run_interface(self, runtime):
        from ..featurevis import AscentSettings, Regularisers
        from ..featurevis.from_bundle import visualise_bundle
        from ..group.layout import ModeLayout

        settings = AscentSettings(iterations=self.inputs.iterations, regularisers=Regularisers(**GROUP_REGULARISERS))
        figures = []
        for model_dir in map(Path, self.inputs.model_dirs):
            classes = json.loads((model_dir / "model_card.json").read_text())["classes"]
            for cls in classes:
                LOG.info("feature visualisation: %s, class %r (%d iterations)", model_dir.parent.name, cls,
                         settings.iterations)
                try:
                    out = visualise_bundle(model_dir, ModeLayout(model_dir.parent).featurevis_dir, str(cls), settings,
                                           device=self.inputs.device)
                except (ValueError, RuntimeError) as err:  # one class failing keeps the others and the report
                    LOG.error("feature visualisation of %s, class %r failed: %s", model_dir, cls, err)
                    continue
                figures.append(str(out.figure))
        self._results["figures"] = figures
        return runtime
