"""Raw T1w heads: N4 bias-field correction and brain extraction (in process, offline).

* `N4BiasCorrection`: antspyx's N4 (shrink 4, 4x50 iterations, B-spline distance 200 mm,
  fMRIPrep's settings) on the whole image; the output keeps the input's intensity
  range (N4 divides by a smooth field) and is written as float32.
* `BrainExtraction`: deepbet (Fisch et al., Comput Biol Med 2024; MIT licence), a 3D
  U-Net whose two TorchScript models ship *inside* the installed wheel
  (``site-packages/data/models/{bbox_model,model}.pt``). They are loaded with
  ``torch.jit.load`` from that installed path only (TorchScript archives hold code in the
  restricted TorchScript language and tensors; nothing is downloaded and no file of the
  user's is unpickled). Chosen by measurement against an atlas-free alternative: see
  docs/preprocessing.md ("Brain extraction").
  The mask is checked: empty, or a volume outside `MIN_BRAIN_VOLUME_ML`-`MAX_BRAIN_VOLUME_ML`
  raises `BrainExtractionError` naming the file (a per-participant failure).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .masks import _save_like
from .registration import MAX_BRAIN_VOLUME_ML, MIN_BRAIN_VOLUME_ML, itk_threads

N4_DESCRIPTION = ("N4 (ANTsPy n4_bias_field_correction): shrink 4, 4x50 iterations, "
                  "tolerance 1e-7, B-spline distance 200 mm, whole image")
EXTRACTION_METHOD = "deepbet 1.0.2 (3D U-Net, weights shipped in the package), threshold 0.5"


class BrainExtractionError(ValueError):
    """The extractor returned no plausible brain for this image."""


# --------------------------------------------------------------------------- N4
class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw T1w")
    shrink_factor = traits.Int(4, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected T1w (float32, input grid and header)")
    elapsed_seconds = traits.Float()


def n4_correct(in_file: str, out_file: str, shrink_factor: int = 4) -> str:
    """N4 of `in_file` (negative values clipped: N4 works on log intensities)."""
    import ants

    image = ants.image_read(in_file).clone("float")
    image = image.new_image_like(np.clip(image.numpy(), 0, None))
    corrected = ants.n4_bias_field_correction(
        image, shrink_factor=shrink_factor,
        convergence={"iters": [50, 50, 50, 50], "tol": 1e-7}, spline_param=200,
    )
    source = nb.load(in_file)
    data = np.asarray(corrected.numpy(), dtype=np.float32)
    # ITK and nibabel share the array layout; keep the source header (sform/qform as given)
    return str(_save_like(data, source, Path(out_file), dtype=np.float32))


class N4BiasCorrection(SimpleInterface):
    """N4 bias-field correction of a T1w (antspyx, in process)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        start = time.perf_counter()
        with itk_threads(self.inputs.num_threads):
            out = n4_correct(self.inputs.in_file, str(Path(runtime.cwd) / "t1w_n4.nii.gz"),
                             self.inputs.shrink_factor)
        self._results.update(out_file=out, elapsed_seconds=time.perf_counter() - start)
        return runtime


# --------------------------------------------------------------------------- extraction
def _deepbet_model_files() -> tuple[Path, Path]:
    """The two TorchScript files of the installed deepbet wheel (never downloaded)."""
    try:
        from deepbet.utils import DATA_PATH
    except ImportError as exc:  # pragma: no cover - a dependency in setup.py
        raise RuntimeError("brain extraction needs the deepbet package (pip install deepbet)") from exc
    models = Path(DATA_PATH) / "models"
    files = (models / "model.pt", models / "bbox_model.pt")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"deepbet's model files are missing from its installation: {missing}")
    return files


def extract_brain(t1w: nb.Nifti1Image, device: str = "cpu", threshold: float = 0.5) -> np.ndarray:
    """Boolean brain mask of `t1w` on its own grid (deepbet)."""
    import torch
    from deepbet.bet import BrainExtraction as _DeepBet

    model, bbox_model = _deepbet_model_files()
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    bet = _DeepBet(no_gpu=use_cpu, model_path=str(model), bbox_model_path=str(bbox_model))
    if not use_cpu:
        bet.model.to("cuda")
        bet.bbox_model.to("cuda")
    data = np.asanyarray(t1w.dataobj)
    if data.ndim == 4:
        t1w = t1w.slicer[..., 0]
    try:
        _, mask_img, _ = bet.run(nb.Nifti1Image(np.asarray(t1w.dataobj, dtype=np.float32),
                                                t1w.affine, t1w.header), threshold=threshold)
    except (AssertionError, ValueError) as exc:  # deepbet: "Not enough foreground ..."
        raise BrainExtractionError(f"brain extraction found no brain ({exc})") from exc
    return np.asanyarray(mask_img.dataobj) > 0


class _ExtractInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w head (bias-corrected)")
    source_file = traits.Str(desc="raw T1w, named in error messages")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    min_volume_ml = traits.Float(MIN_BRAIN_VOLUME_ML, usedefault=True)
    max_volume_ml = traits.Float(MAX_BRAIN_VOLUME_ML, usedefault=True)


class _ExtractOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="uint8 brain mask on the T1w grid")
    out_brain = File(exists=True, desc="in_file * mask (float32)")
    volume_ml = traits.Float()
    elapsed_seconds = traits.Float()
    metadata = traits.Dict(desc="sidecar fields: method and volume")


class BrainExtraction(SimpleInterface):
    """Brain mask of a T1w head (deepbet), checked for a plausible volume."""

    input_spec = _ExtractInputSpec
    output_spec = _ExtractOutputSpec

    def _run_interface(self, runtime):
        import torch

        inputs = self.inputs
        name = inputs.source_file if isdefined_str(inputs.source_file) else inputs.in_file
        img = nb.load(inputs.in_file)
        device = "cuda" if inputs.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, inputs.num_threads))
        start = time.perf_counter()
        try:
            mask = extract_brain(img, device=device)
        except BrainExtractionError as exc:
            raise BrainExtractionError(f"{name}: {exc}") from exc
        finally:
            torch.set_num_threads(threads)
        elapsed = time.perf_counter() - start
        volume = float(mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000.0)
        if not inputs.min_volume_ml <= volume <= inputs.max_volume_ml:
            raise BrainExtractionError(
                f"{name}: brain extraction returned a mask of {volume:.0f} ml, not a plausible "
                f"brain ({inputs.min_volume_ml:g}-{inputs.max_volume_ml:g} ml); is this a T1w "
                "head with the brain in the field of view?")
        cwd = Path(runtime.cwd)
        out_mask = _save_like(mask, img, cwd / "brain_mask.nii.gz")
        brain = np.asanyarray(img.dataobj).astype(np.float32) * mask
        out_brain = _save_like(brain, img, cwd / "t1w_brain.nii.gz", dtype=np.float32)
        self._results.update(
            out_mask=str(out_mask), out_brain=str(out_brain), volume_ml=volume,
            elapsed_seconds=elapsed,
            metadata={"BrainExtraction": {"Method": EXTRACTION_METHOD, "Device": device,
                                          "VolumeMl": round(volume, 1)}},
        )
        return runtime


def isdefined_str(value) -> bool:
    from nipype.interfaces.base import isdefined

    return isdefined(value) and bool(value)


def looks_brain_extracted(path: str | os.PathLike) -> bool:
    """Decides `--skull-strip auto` before the workflow is built: a brain-extracted T1w
    has an exactly-zero background, so its signal (T1w > 0, largest component, holes
    filled) is a plausible brain volume. A head's signal (skull, scalp, background
    noise) is larger than `MAX_BRAIN_VOLUME_ML` (ds000011 heads, IXI: > 3 l)."""
    from .masks import brain_mask_from_t1w

    img = nb.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    volume = brain_mask_from_t1w(data).sum() * np.prod(img.header.get_zooms()[:3]) / 1000.0
    return bool(MIN_BRAIN_VOLUME_ML <= volume <= MAX_BRAIN_VOLUME_ML)
