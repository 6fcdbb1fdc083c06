"""Raw heads: N4, brain extraction (volume checks, offline weights), the auto decision,
the Atropos segmentation, and the participant workflow's head branch."""
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from grazbids.interfaces import skullstrip
from grazbids.interfaces.masks import dice
from grazbids.interfaces.segmentation import TissueSegmentation, segment_tissues
from grazbids.interfaces.skullstrip import (
    BrainExtraction,
    BrainExtractionError,
    N4BiasCorrection,
    looks_brain_extracted,
)
from grazbids.workflows.participant import needs_skull_strip

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IXI = DATA / "ixi-heads"


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))


def synthetic_head(shape=(40, 48, 40), zoom=4.0, background_noise=True, seed=0):
    """Brain (WM core, GM shell, CSF rim) inside skull and scalp, 4 mm voxels: brain
    ~1.4 l, head ~4 l. Returns (image, brain mask, dseg with 1 CSF / 2 GM / 3 WM)."""
    rng = np.random.default_rng(seed)
    r = np.sqrt(((_grid(shape) * zoom) ** 2 / np.array([62.0, 78.0, 62.0])[:, None, None, None] ** 2).sum(0))
    dseg = np.select([r < 0.55, r < 0.85, r < 1.0], [3, 2, 1], 0).astype(np.uint8)
    image = np.select([dseg == 3, dseg == 2, dseg == 1, r < 1.12, r < 1.3],
                      [110.0, 70.0, 25.0, 10.0, 90.0], 0.0)
    image = image + rng.normal(0, 3.0, shape) * (image > 0)
    if background_noise:
        image = image + np.abs(rng.normal(0, 2.0, shape))
    return np.clip(image, 0, None).astype(np.float32), dseg > 0, dseg


def _save(path, data, zoom=4.0, dtype=np.float32):
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -np.array(data.shape) * zoom / 2
    nb.save(nb.Nifti1Image(np.asarray(data, dtype), affine), path)
    return str(path)


# ----------------------------------------------------------------------- auto decision
def test_auto_decision_tells_heads_from_extracted_brains(tmp_path):
    head, brain, _ = synthetic_head()
    assert not looks_brain_extracted(_save(tmp_path / "noisy_head.nii.gz", head))
    no_noise, _, _ = synthetic_head(background_noise=False)
    assert not looks_brain_extracted(_save(tmp_path / "head.nii.gz", no_noise))  # ~4 l of signal
    stripped = _save(tmp_path / "brain.nii.gz", no_noise * brain)
    assert looks_brain_extracted(stripped)
    assert needs_skull_strip(stripped, "auto") is False
    assert needs_skull_strip(stripped, "force") is True
    assert needs_skull_strip(str(tmp_path / "noisy_head.nii.gz"), "auto") is True
    assert needs_skull_strip(str(tmp_path / "noisy_head.nii.gz"), "skip") is False
    with pytest.raises(ValueError, match="skull_strip"):
        needs_skull_strip(stripped, "sometimes")


# ----------------------------------------------------------------------- N4
def test_n4_removes_a_smooth_multiplicative_field(tmp_path):
    head, _, dseg = synthetic_head(background_noise=False)
    x = _grid(head.shape)[0] / head.shape[0]
    biased = head * (1.0 + 1.2 * x)  # 0.4 .. 1.6 left to right
    node = N4BiasCorrection(in_file=_save(tmp_path / "biased.nii.gz", biased), shrink_factor=2)
    result = node.run(cwd=str(tmp_path)).outputs
    corrected = np.asanyarray(nb.load(result.out_file).dataobj)
    wm = dseg == 3

    def right_left_ratio(image):  # mean WM intensity right of the centre / left of it
        return float(image[wm & (x > 0)].mean() / image[wm & (x < 0)].mean())

    assert right_left_ratio(biased) > 1.15
    assert abs(right_left_ratio(corrected) - 1.0) < 0.4 * (right_left_ratio(biased) - 1.0)
    out = nb.load(result.out_file)
    assert out.get_data_dtype() == np.float32 and np.allclose(out.affine, nb.load(node.inputs.in_file).affine)


# ----------------------------------------------------------------------- extraction checks
@pytest.mark.parametrize("blob_ml, message", [(0.0, "no brain"), (50.0, "not a plausible brain"),
                                               (None, "not a plausible brain")])
def test_extraction_with_an_absurd_mask_fails_naming_the_file(tmp_path, monkeypatch, blob_ml, message):
    head, _, _ = synthetic_head()
    path = _save(tmp_path / "head.nii.gz", head)

    def fake(img, device="cpu", threshold=0.5):
        if blob_ml == 0.0:
            raise BrainExtractionError("brain extraction found no brain (Not enough foreground)")
        if blob_ml is None:  # the whole field of view (~4.9 l)
            return np.ones(img.shape, bool)
        mask = np.zeros(img.shape, bool)
        mask[:4, :4, :12] = True  # 12 ml
        return mask

    monkeypatch.setattr(skullstrip, "extract_brain", fake)
    node = BrainExtraction(in_file=path, source_file="/bids/sub-01/anat/sub-01_T1w.nii.gz")
    with pytest.raises(BrainExtractionError, match=message) as err:
        node.run(cwd=str(tmp_path))
    assert "sub-01_T1w.nii.gz" in str(err.value)


def test_extraction_outputs_mask_brain_and_sidecar_fields(tmp_path, monkeypatch):
    head, brain, _ = synthetic_head()
    monkeypatch.setattr(skullstrip, "extract_brain", lambda img, device="cpu", threshold=0.5: brain)
    result = BrainExtraction(in_file=_save(tmp_path / "head.nii.gz", head)).run(cwd=str(tmp_path)).outputs
    mask = np.asanyarray(nb.load(result.out_mask).dataobj)
    assert mask.dtype == np.uint8 and np.array_equal(mask > 0, brain)
    kept = np.asanyarray(nb.load(result.out_brain).dataobj)
    assert np.allclose(kept, head * brain, atol=1e-4)
    assert result.volume_ml == pytest.approx(brain.sum() * 64 / 1000)
    assert "deepbet" in result.metadata["BrainExtraction"]["Method"]


def test_deepbet_weights_ship_inside_the_installed_package():
    model, bbox = skullstrip._deepbet_model_files()
    import deepbet

    package_root = Path(deepbet.__file__).resolve().parents[1]
    for path in (model, bbox):
        assert path.is_file() and package_root in path.resolve().parents
        assert path.stat().st_size > 1_000_000


# ----------------------------------------------------------------------- segmentation
def test_atropos_recovers_the_tissues_of_a_synthetic_brain(tmp_path):
    head, brain, dseg = synthetic_head(background_noise=False)
    from scipy import ndimage as ndi

    # priors: the true classes, blurred and shifted by one voxel (an imperfect registration)
    priors = {t: ndi.shift(ndi.gaussian_filter((dseg == k).astype(float), 1.5), (1, 0, 0), order=1)
              for t, k in (("CSF", 1), ("GM", 2), ("WM", 3))}
    files = [_save(tmp_path / f"prior_{t}.nii.gz", priors[t]) for t in ("GM", "WM", "CSF")]
    node = TissueSegmentation(in_file=_save(tmp_path / "head.nii.gz", head),
                              brain_mask=_save(tmp_path / "mask.nii.gz", brain, dtype=np.uint8),
                              priors=files)
    result = node.run(cwd=str(tmp_path)).outputs
    found = np.asanyarray(nb.load(result.dseg).dataobj)
    assert set(np.unique(found)) <= {0, 1, 2, 3}
    assert np.all(found[~brain] == 0)
    for k in (1, 2, 3):
        assert dice(found == k, dseg == k) > 0.85
    gm, wm, csf = (np.asanyarray(nb.load(f).dataobj) for f in result.probsegs)
    assert np.allclose((gm + wm + csf)[brain], 1.0, atol=1e-3)
    assert result.metadata["Segmentation"]["Labels"]["2"] == "GM"


def test_segmentation_refuses_an_empty_mask():
    import ants

    image = ants.from_numpy(np.ones((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        segment_tissues(image, np.zeros((8, 8, 8), bool), {t: np.ones((8, 8, 8)) for t in ("GM", "WM", "CSF")})


# ----------------------------------------------------------------------- real heads
@pytest.mark.realdata
def test_deepbet_on_a_real_ixi_head_matches_the_reference_mask():
    sub = "sub-IXI132"
    t1w = IXI / sub / "anat" / f"{sub}_T1w.nii.gz"
    if not t1w.exists():
        pytest.skip(f"IXI heads not found at {IXI}")
    reference = np.asanyarray(nb.load(IXI / "derivatives" / "masks" / sub / "anat"
                                      / f"{sub}_desc-brain_mask.nii.gz").dataobj) > 0
    mask = skullstrip.extract_brain(nb.load(t1w))
    assert dice(mask, reference) >= 0.95
    assert not looks_brain_extracted(t1w)


@pytest.mark.realdata
@pytest.mark.slow
def test_participant_workflow_on_a_real_head(tmp_path):
    """One IXI head (2 mm), affine, res 2: extraction, QC from the extracted brain,
    segmentation and every derivative with its sidecar."""
    from grazbids.templates import EMBEDDED_TEMPLATE as TPL
    from grazbids.workflows.participant import init_participant_wf

    sub = "IXI132"
    t1w = IXI / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
    if not t1w.exists():
        pytest.skip(f"IXI heads not found at {IXI}")
    out = tmp_path / "out"
    wf = init_participant_wf(subject=sub, t1w_files=[str(t1w)], bids_dir=str(IXI), output_dir=str(out),
                             template=TPL, resolution=2, registration="affine", omp_nthreads=1, seed=42)
    wf.base_dir = str(tmp_path / "work")
    wf.run(plugin="Linear")
    anat = out / f"sub-{sub}" / "anat"
    preproc = json.loads((anat / f"sub-{sub}_space-{TPL}_res-2_desc-preproc_T1w.json").read_text())
    assert preproc["SkullStripped"] is False and "deepbet" in preproc["BrainExtraction"]["Method"]
    assert preproc["RegistrationQC"]["BrainMaskDice"] >= 0.94
    assert "brain-extraction mask" in preproc["RegistrationQC"]["Definition"]
    native = json.loads((anat / f"sub-{sub}_desc-preproc_T1w.json").read_text())
    assert native["SkullStripped"] is False and "N4" in native["BiasFieldCorrection"]
    reference = np.asanyarray(nb.load(IXI / "derivatives" / "masks" / f"sub-{sub}" / "anat"
                                      / f"sub-{sub}_desc-brain_mask.nii.gz").dataobj) > 0
    mask = np.asanyarray(nb.load(anat / f"sub-{sub}_desc-brain_mask.nii.gz").dataobj) > 0
    assert dice(mask, reference) >= 0.95
    dseg = np.asanyarray(nb.load(anat / f"sub-{sub}_dseg.nii.gz").dataobj)
    shares = [float((dseg == k).sum() / (dseg > 0).sum()) for k in (1, 2, 3)]
    assert all(0.1 < s < 0.6 for s in shares), shares  # CSF, GM, WM all present, none dominant
    for tissue in ("GM", "WM", "CSF"):
        assert (anat / f"sub-{sub}_space-{TPL}_res-2_label-{tissue}_probseg.nii.gz").exists()
    report = (out / f"sub-{sub}.html").read_text()
    assert "Brain mask and tissue segmentation" in report and "below 0.94" not in report


# ----------------------------------------------------------------------- report
def test_report_shows_extraction_and_segmentation_on_a_sagittal_head(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from report_helpers import write_participant_outputs

    from grazbids.reports import discover_t1w_outputs, render_t1w_section
    from grazbids.reports.brain_figures import axial_cuts

    out = tmp_path / "out"
    write_participant_outputs(out, with_model=False)
    head, brain, dseg = synthetic_head(shape=(30, 36, 30))
    # stored P-S-R like the IXI heads: voxel axes are (posterior, superior, right)
    psr = np.array([[0, 0, 4.0, -60], [-4.0, 0, 0, 70], [0, 4.0, 0, -60], [0, 0, 0, 1]])
    files = {}
    for name, data, dtype in (("t1w", head, np.float32), ("mask", brain, np.uint8), ("dseg", dseg, np.uint8)):
        files[name] = tmp_path / f"{name}.nii.gz"
        nb.save(nb.Nifti1Image(data.astype(dtype), psr), files[name])
    cuts = axial_cuts(str(files["mask"]))
    assert len(set(np.round(cuts, 3))) == len(cuts)  # distinct world z, not one voxel plane
    outputs = discover_t1w_outputs(out, "sub-01")[0]
    outputs.t1w_native, outputs.brain_mask_native = str(files["t1w"]), str(files["mask"])
    outputs.dseg_native, outputs.template_mask = str(files["dseg"]), outputs.brain_mask
    html = render_t1w_section(outputs, out)
    assert "<h3>Brain mask and tissue segmentation (native space)</h3>" in html
    assert html.count("data:image/png;base64,") == 4  # extraction, segmentation, registration, input


def test_deepbet_on_a_mostly_background_image_fails_naming_the_file(tmp_path):
    """A 120x120x90 field of view at 2 mm that is empty but for a 2.4 cm cube of noise."""
    data = np.zeros((120, 120, 90), np.float32)
    data[50:62, 50:62, 40:52] = np.random.default_rng(0).uniform(20, 200, (12, 12, 12))
    path = _save(tmp_path / "sub-bg_T1w.nii.gz", data, zoom=2.0)
    with pytest.raises(BrainExtractionError, match="sub-bg_T1w.nii.gz: brain extraction") as err:
        BrainExtraction(in_file=path, source_file=path).run(cwd=str(tmp_path))
    assert "no brain" in str(err.value) or "not a plausible brain" in str(err.value)
    assert not list(tmp_path.glob("brain_mask*"))  # nothing half-written


# ----------------------------------------------------------------------- --input-image
def test_network_input_masks_heads_only_for_brain_input(tmp_path):
    from grazbids.utils.input_image import is_skull_stripped, network_input

    image = np.arange(27, dtype=np.float32).reshape(3, 3, 3) + 1
    mask = np.zeros((3, 3, 3))
    mask[1] = 1
    brain = network_input(image, mask, input_image="brain", skull_stripped=False)
    assert np.all(brain[1] == image[1]) and not brain[0].any() and not brain[2].any()
    assert np.array_equal(network_input(image, mask, input_image="head", skull_stripped=False), image)
    # an already brain-extracted image is never cut by the (template's) mask
    assert np.array_equal(network_input(image, mask, input_image="brain", skull_stripped=True), image)
    with pytest.raises(ValueError, match="input_image"):
        network_input(image, mask, input_image="skull", skull_stripped=False)
    t1w = tmp_path / "sub-01_desc-preproc_T1w.nii.gz"
    assert is_skull_stripped(t1w)  # no sidecar: outputs from before heads were supported
    t1w.with_name("sub-01_desc-preproc_T1w.json").write_text(json.dumps({"SkullStripped": False}))
    assert not is_skull_stripped(t1w)


def test_group_cohort_masks_heads_for_brain_input_only(tmp_path):
    from grazbids.group.cohort import Sample, load_cohort

    head, brain, _ = synthetic_head()
    samples = []
    for k, (label, stripped) in enumerate((("a", False), ("b", False), ("c", True))):
        image = _save(tmp_path / f"sub-{k}_desc-preproc_T1w.nii.gz", head if not stripped else head * brain)
        Path(image.replace(".nii.gz", ".json")).write_text(json.dumps({"SkullStripped": stripped}))
        mask = _save(tmp_path / f"sub-{k}_desc-brain_mask.nii.gz", brain, dtype=np.uint8)
        samples.append(Sample(str(k), None, Path(image), Path(mask), label))
    as_brain, _, _ = load_cohort(samples, input_image="brain")
    as_head, _, _ = load_cohort(samples, input_image="head")
    outside = ~brain
    assert not as_brain.images[0, 0].numpy()[outside].any()  # the head was cut to its brain
    assert as_head.images[0, 0].numpy()[outside].any()  # the network sees the skull
    assert np.array_equal(as_brain.images[2], as_head.images[2])  # a stripped image is left as is
    assert np.array_equal(as_brain.masks.numpy(), as_head.masks.numpy())  # Graz+ mask: the brain either way
