"""Outputs resampled onto a native grid keep that image's header (qform != sform case)."""
import ants
import nibabel as nb
import numpy as np

from grazbids.interfaces.registration import ApplyTransforms


def test_output_keeps_reference_sform_when_qform_differs(tmp_path):
    data = np.zeros((12, 10, 8), np.float32)
    data[3:9, 3:7, 2:6] = 1
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform[:3, 3] = [-10, -8, -6]
    qform = sform.copy()
    qform[:3, 3] += [7, 0, 0]  # an oblique/odd scan: the two header transforms disagree
    img = nb.Nifti1Image(data, sform)
    img.set_sform(sform, 2)  # 'aligned' sform + 'scanner' qform, as sub-29 of ds002748
    img.set_qform(qform, 1)
    ref = tmp_path / "ref.nii.gz"
    nb.save(img, str(ref))
    identity = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    xfm = tmp_path / "identity.mat"
    ants.write_transform(identity, str(xfm))

    result = ApplyTransforms(input_image=str(ref), reference_image=str(ref), transforms=[str(xfm)],
                             interpolation="nearestNeighbor").run(cwd=str(tmp_path))
    out = nb.load(result.outputs.output_image)
    np.testing.assert_allclose(out.affine, img.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), data)
