"""RegisterToTemplate / ApplyTransforms on a synthetic brain with a known affine."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nb
import numpy as np
import pytest

from grazbids.interfaces.masks import BrainMaskOverlap, dice
from grazbids.interfaces.registration import (
    STAGES,
    ApplyTransforms,
    antsregistration_args,
)

REPO = Path(__file__).resolve().parents[1]

# moving = template shrunk by 10 %, rotated 6 degrees about z, shifted (mm)
_ANGLE = np.deg2rad(6.0)
_MOVING_FROM_TEMPLATE = np.array([
    [0.9 * np.cos(_ANGLE), -0.9 * np.sin(_ANGLE), 0.0, 5.0],
    [0.9 * np.sin(_ANGLE), 0.9 * np.cos(_ANGLE), 0.0, -3.0],
    [0.0, 0.0, 0.9, 4.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _phantom(points: np.ndarray) -> np.ndarray:
    """Brain-like intensities at physical points (N, 3) in template space (mm)."""
    x, y, z = points.T
    brain = (x / 65) ** 2 + (y / 80) ** 2 + (z / 58) ** 2
    values = np.where(brain <= 1, 60.0, 0.0)  # cortex-like shell
    values[brain <= 0.7] = 100.0  # white matter
    for cx in (-12.0, 12.0):  # ventricles
        values[((x - cx) / 8) ** 2 + ((y - 5) / 25) ** 2 + ((z - 8) / 10) ** 2 <= 1] = 20.0
    values[((x / 20) ** 2 + ((y + 10) / 15) ** 2 + ((z + 10) / 12) ** 2 <= 1)] = 75.0  # deep GM
    return values * (1.0 + 0.1 * np.sin(y / 15.0))  # a smooth gradient for MI to use


def _grid(shape, spacing):
    origin = -0.5 * spacing * (np.asarray(shape) - 1)
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = origin
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return affine, ijk @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    shape = (80, 96, 76)
    affine, points = _grid(shape, 2.0)
    template = _phantom(points).reshape(shape).astype(np.float32)
    nb.save(nb.Nifti1Image(template, affine), root / "template_T1w.nii.gz")
    nb.save(nb.Nifti1Image((template > 0).astype(np.uint8), affine), root / "template_mask.nii.gz")
    m_shape = (96, 112, 88)
    m_affine, m_points = _grid(m_shape, 1.5)
    inverse = np.linalg.inv(_MOVING_FROM_TEMPLATE)
    moving = _phantom(m_points @ inverse[:3, :3].T + inverse[:3, 3]).reshape(m_shape)
    nb.save(nb.Nifti1Image(moving.astype(np.float32), m_affine), root / "sub-01_T1w.nii.gz")
    return root


_REGISTER_TWICE = """
import json, sys
from pathlib import Path
from grazbids.interfaces.masks import NativeBrainMask
from grazbids.interfaces.registration import RegisterToTemplate
root = Path(sys.argv[1])
mask = NativeBrainMask(in_file=str(root / "sub-01_T1w.nii.gz")).run(cwd=str(root))
runs = []
for attempt in (1, 2):
    cwd = root / f"run{attempt}"
    cwd.mkdir()
    result = RegisterToTemplate(
        moving_image=str(root / "sub-01_T1w.nii.gz"),
        fixed_image=str(root / "template_T1w.nii.gz"),
        fixed_mask=str(root / "template_mask.nii.gz"),
        moving_mask=mask.outputs.out_mask, registration="affine", random_seed=7,
        num_threads=1,
    ).run(cwd=str(cwd))
    runs.append(result.outputs.get())
print(json.dumps({"moving_mask": mask.outputs.out_mask, "runs": runs}))
"""


@pytest.fixture(scope="module")
def registered(phantom):
    """Affine registration of the phantom, run twice (determinism).

    In a fresh interpreter: ITK fixes its thread count when it first starts threads in
    a process, and only single-threaded registration is bit-reproducible."""
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _REGISTER_TWICE, str(phantom)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = [SimpleNamespace(outputs=SimpleNamespace(**run)) for run in result["runs"]]
    return result["moving_mask"], runs


def test_affine_registration_recovers_the_brain(phantom, registered):
    moving_mask, (result, _) = registered
    out = result.outputs
    assert out.mask_term_used
    assert [Path(p).name for p in out.forward_transforms] == ["xfm_moving_to_fixed.h5"]
    assert [Path(p).name for p in out.reverse_transforms] == ["xfm_fixed_to_moving.h5"]
    warped = nb.load(out.warped_image)
    assert warped.shape == (80, 96, 76)
    overlap = BrainMaskOverlap(moving_mask=moving_mask,
                               template_mask=str(phantom / "template_mask.nii.gz"),
                               transforms=out.forward_transforms).run(cwd=str(phantom))
    assert overlap.outputs.dice > 0.97
    assert overlap.outputs.metadata["RegistrationQC"]["BrainMaskDice"] > 0.97
    assert out.registration_metadata["Stages"] == ["Rigid", "Affine"]


def test_registration_is_deterministic_with_a_seed(registered):
    import ants

    _, (first, second) = registered
    a = ants.read_transform(first.outputs.forward_transforms[0]).parameters
    b = ants.read_transform(second.outputs.forward_transforms[0]).parameters
    assert np.array_equal(a, b)
    assert np.array_equal(nb.load(first.outputs.warped_image).get_fdata(),
                          nb.load(second.outputs.warped_image).get_fdata())


def test_apply_transforms_round_trip(phantom, registered, tmp_path):
    moving_mask, (result, _) = registered
    to_template = ApplyTransforms(
        input_image=moving_mask, reference_image=str(phantom / "template_T1w.nii.gz"),
        transforms=result.outputs.forward_transforms, interpolation="linear",
    ).run(cwd=str(tmp_path))
    back = ApplyTransforms(
        input_image=to_template.outputs.output_image, reference_image=moving_mask,
        transforms=result.outputs.reverse_transforms, interpolation="linear",
        out_file="roundtrip.nii.gz",
    ).run(cwd=str(tmp_path))
    assert Path(back.outputs.output_image).name == "roundtrip.nii.gz"
    original = nb.load(moving_mask).get_fdata() > 0
    assert dice(nb.load(back.outputs.output_image).get_fdata() > 0.5, original) > 0.97
    # template mask to native, nearest neighbour, stored as uint8
    native = ApplyTransforms(
        input_image=str(phantom / "template_mask.nii.gz"), reference_image=moving_mask,
        transforms=result.outputs.reverse_transforms, interpolation="nearestNeighbor",
        output_dtype="uint8",
    ).run(cwd=str(tmp_path))
    img = nb.load(native.outputs.output_image)
    assert img.get_data_dtype() == np.uint8 and set(np.unique(img.dataobj)) <= {0, 1}
    assert dice(np.asanyarray(img.dataobj) > 0, original) > 0.97


def test_apply_transforms_inverts_affine_matrices(phantom, tmp_path):
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.diag([1.1, 0.95, 1.0]), offset=(4.0, -2.0, 1.0))
    mat = str(tmp_path / "affine.mat")
    ants.write_transform(tx, mat)
    image = str(phantom / "template_mask.nii.gz")
    there = ApplyTransforms(input_image=image, reference_image=image, transforms=[mat],
                            out_file="there.nii.gz").run(cwd=str(tmp_path))
    back = ApplyTransforms(input_image=there.outputs.output_image, reference_image=image,
                           transforms=[mat], invert_transform_flags=[True],
                           out_file="back.nii.gz").run(cwd=str(tmp_path))
    assert dice(nb.load(back.outputs.output_image).get_fdata() > 0.5,
                nb.load(image).get_fdata() > 0) > 0.98
    with pytest.raises(ValueError, match="only affine .mat"):
        ApplyTransforms(input_image=image, reference_image=image,
                        transforms=[str(phantom / "run1" / "xfm_moving_to_fixed.h5")],
                        invert_transform_flags=[True]).run(cwd=str(tmp_path))


def test_schedule_is_defined_in_mm():
    common = dict(fixed="f.nii.gz", moving="m.nii.gz", out_prefix="p_", seed=3, mask_weight=1.0)
    at_2mm = antsregistration_args(fixed_mask="fm.nii.gz", moving_mask="mm.nii.gz",
                                   stages=STAGES["nonlinear"], fixed_spacing_mm=2.0, **common)
    at_1mm = antsregistration_args(fixed_mask=None, moving_mask=None,
                                   stages=STAGES["affine"], fixed_spacing_mm=1.0, **common)
    shrink = lambda args: [args[i + 1] for i, a in enumerate(args) if a == "--shrink-factors"]
    assert shrink(at_2mm) == ["4", "4x2", "4x2"]
    assert shrink(at_1mm) == ["8", "8x4"]
    assert sum("MeanSquares[fm.nii.gz,mm.nii.gz" in a for a in at_2mm) == 2  # linear only
    assert not any("MeanSquares" in a for a in at_1mm)  # no masks, no mask term
    assert at_2mm[at_2mm.index("--initial-moving-transform") + 1] == "[fm.nii.gz,mm.nii.gz,1]"
    assert at_2mm[at_2mm.index("--random-seed") + 1] == "3"


def test_skullstripped_check_tells_brains_from_heads(phantom, tmp_path):
    from grazbids.interfaces.masks import SkullStrippedCheck

    brain_img = nb.load(phantom / "template_T1w.nii.gz")
    brain = brain_img.get_fdata()
    mask = phantom / "template_mask.nii.gz"
    assert SkullStrippedCheck(in_file=str(phantom / "template_T1w.nii.gz"),
                              brain_mask=str(mask)).run(cwd=str(tmp_path)).outputs.skull_stripped
    # a "head": a bright scalp/skull shell ~10 mm outside the brain, and the noise floor
    # of an unmasked image (no voxel is exactly 0)
    affine, points = _grid(brain.shape, 2.0)
    x, y, z = points.T
    radius = np.sqrt((x / 75) ** 2 + (y / 90) ** 2 + (z / 68) ** 2).reshape(brain.shape)
    noise = np.random.default_rng(0).uniform(1.0, 4.0, brain.shape)
    head = brain + np.where((radius > 1.0) & (radius < 1.08), 80.0, 0.0) + noise
    head_file = tmp_path / "head_T1w.nii.gz"
    nb.save(nb.Nifti1Image(head.astype(np.float32), brain_img.affine), head_file)
    result = SkullStrippedCheck(in_file=str(head_file), brain_mask=str(mask)).run(cwd=str(tmp_path))
    assert not result.outputs.skull_stripped and result.outputs.outside_fraction > 0.2
    # and the native brain mask of a head is not a plausible brain (mask term is skipped)
    from grazbids.interfaces.masks import NativeBrainMask
    assert NativeBrainMask(in_file=str(head_file)).run(cwd=str(tmp_path)).outputs.volume_ml > 2500
