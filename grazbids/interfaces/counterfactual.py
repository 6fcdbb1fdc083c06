"""Nipype interfaces of the counterfactual warp simulator (grazbids.counterfactual)."""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import BaseInterface, BaseInterfaceInputSpec, File, TraitedSpec, traits

DIRECTIONS = ("inject", "remove")
KINDS = ("T1w", "displacement", "logjacobian")


class _CounterfactualInputSpec(BaseInterfaceInputSpec):
    t1w_template = File(exists=True, mandatory=True, desc="T1w on the template grid")
    brain_mask_template = File(exists=True, mandatory=True, desc="brain mask on the template grid")
    model_dir = traits.Directory(exists=True, mandatory=True, desc="classifier bundle holding simulator/")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)


def _output_spec():
    fields = {f"{d}_{k}": File(exists=True, desc=f"{d}: {k} on the template grid") for d in DIRECTIONS for k in KINDS}
    fields.update({f"{d}_metadata": traits.Dict(desc=f"{d}: sidecar fields") for d in DIRECTIONS})
    fields.update({f"{d}_t1w_metadata": traits.Dict(desc=f"{d}: sidecar fields of the simulated T1w")
                   for d in DIRECTIONS})
    # Nipype pickles the outputs (result_*.pklz, and between MultiProc workers): the class
    # must be importable by name from this module, not from traits' metaclass
    return type("_CounterfactualOutputSpec", (TraitedSpec,), {**fields, "__module__": __name__})


_CounterfactualOutputSpec = _output_spec()


class ParticipantCounterfactual(BaseInterface):
    """Inject and remove the disease pattern of the classifier in one image: simulated T1w,
    displacement field (mm) and log-Jacobian map, probabilities before/after in the metadata."""

    input_spec = _CounterfactualInputSpec
    output_spec = _CounterfactualOutputSpec

    def _run_interface(self, runtime):
        from ..counterfactual.run import apply_to_image

        written = apply_to_image(self.inputs.model_dir, self.inputs.t1w_template, self.inputs.brain_mask_template,
                                 Path(runtime.cwd), device=self.inputs.device)
        self._results = {}
        for direction, entry in written.items():
            for kind in KINDS:
                self._results[f"{direction}_{kind}"] = str(entry["paths"][kind])
            self._results[f"{direction}_metadata"] = entry["metadata"]
            self._results[f"{direction}_t1w_metadata"] = {**entry["metadata"], **self._skull_stripped()}
        return runtime

    def _skull_stripped(self) -> dict:
        """The warped image is as skull-stripped as its source: copy SkullStripped from the
        source's sidecar (the participant level's template-space T1w derivative)."""
        import json

        sidecar = Path(str(self.inputs.t1w_template).replace(".nii.gz", ".json"))
        try:
            value = json.loads(sidecar.read_text()).get("SkullStripped")
        except (OSError, ValueError):
            value = None
        return {"SkullStripped": bool(value)} if value is not None else {"SkullStripped": False}

    def _list_outputs(self):
        return self._results


class _GroupCounterfactualInputSpec(BaseInterfaceInputSpec):
    model_dirs = traits.List(traits.Directory(exists=True), mandatory=True, desc="group/mode-*/model bundles")
    settings = traits.Dict(mandatory=True, desc="GroupSettings.to_dict()")
    checkpoint_dir = traits.Str(nohash=True, desc="persistent folder for the simulator checkpoints")


class _GroupCounterfactualOutputSpec(TraitedSpec):
    summaries = traits.List(File(exists=True), desc="group/mode-*/counterfactual/summary.json")


class GroupCounterfactual(BaseInterface):
    """A simulator against every mode's final model (``--counterfactual EPOCHS``), saved in the
    bundle folder, and the group-mean log-Jacobian maps per class and direction."""

    input_spec = _GroupCounterfactualInputSpec
    output_spec = _GroupCounterfactualOutputSpec

    def _run_interface(self, runtime):
        import logging

        from nipype.interfaces.base import isdefined

        from ..config import GroupSettings
        from ..counterfactual.group import group_counterfactual

        settings = GroupSettings.from_dict(self.inputs.settings)
        root = Path(self.inputs.checkpoint_dir) if isdefined(self.inputs.checkpoint_dir) else Path(runtime.cwd)
        summaries = []
        for model_dir in map(Path, self.inputs.model_dirs):
            try:
                out = group_counterfactual(
                    model_dir, bids_dir=settings.bids_dir, output_dir=settings.output_dir,
                    participants=settings.participants, epochs=settings.counterfactual, seed=settings.seed,
                    device=settings.device, workdir=root / f"counterfactual-{model_dir.parent.name}",
                    atlas=settings.atlas)
            except (ValueError, RuntimeError) as err:  # one mode failing keeps the others and the report
                logging.getLogger("grazbids").error("counterfactual simulator for %s failed: %s", model_dir, err)
                continue
            summaries.append(str(out / "summary.json"))
        self._summaries = summaries
        return runtime

    def _list_outputs(self):
        return {"summaries": self._summaries}
