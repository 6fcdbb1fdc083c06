"""BIDS-Derivatives naming, sidecars and atomic writes of DerivativesSink."""
import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from grazbids.interfaces import derivatives
from grazbids.bids.naming import bids_derivative_name, bids_uri
from grazbids.interfaces.derivatives import DerivativesSink

SOURCE = "sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_T1w.nii.gz"


@pytest.fixture
def bids(tmp_path):
    """A raw dataset with one T1w and a small image to store."""
    bids_dir = tmp_path / "raw"
    source = bids_dir / SOURCE
    source.parent.mkdir(parents=True)
    img = nb.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.diag([2, 2, 2, 1]))
    nb.save(img, source)
    result = tmp_path / "work" / "result.nii.gz"
    result.parent.mkdir()
    nb.save(img, result)
    return bids_dir, source, result, tmp_path / "out"


def _sink(bids, **kwargs):
    bids_dir, source, result, out = bids
    params = dict(in_file=str(result), source_file=str(source), bids_dir=str(bids_dir),
                  output_dir=str(out))
    params.update(kwargs)
    return DerivativesSink(**params)


def test_name_keeps_source_entities_in_bids_order():
    name = bids_derivative_name(SOURCE, space="MNI152NLin2009aSym", res=2, desc="preproc",
                                suffix="T1w", extension=".nii.gz")
    assert name == ("sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_"
                    "space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz")
    name = bids_derivative_name("sub-01/anat/sub-01_T1w.nii.gz", space="X", res="1",
                                label="GM", suffix="probseg", extension="nii.gz")
    assert name == "sub-01/anat/sub-01_space-X_res-1_label-GM_probseg.nii.gz"


def test_name_of_transforms():
    name = bids_derivative_name("sub-01/anat/sub-01_T1w.nii.gz", from_="T1w",
                                to="MNI152NLin2009aSym", mode="image", suffix="xfm",
                                extension=".h5")
    assert name == "sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"


@pytest.mark.parametrize("bad", [dict(desc="brain_mask"), dict(space="MNI-152"),
                                 dict(hemi="L")])
def test_name_rejects_invalid_entities(bad):
    with pytest.raises(ValueError):
        bids_derivative_name("sub-01/anat/sub-01_T1w.nii.gz", suffix="mask",
                             extension=".nii.gz", **bad)


def test_bids_uri_and_outside_dataset(tmp_path):
    assert bids_uri(tmp_path / "raw/sub-01/anat/x.nii.gz", tmp_path / "raw") == \
        "bids:raw:sub-01/anat/x.nii.gz"
    with pytest.raises(ValueError, match="not inside"):
        bids_uri(tmp_path / "elsewhere/x.nii.gz", tmp_path / "raw")


def test_t1w_in_template_space_with_sidecar(bids):
    res = _sink(bids, space="MNI152NLin2009aSym", res=2, desc="preproc", suffix="T1w",
                skull_stripped=True, metadata={"Extra": 1},
                extra_sources=["bids::sub-01/anat/x_xfm.h5"]).run()
    out = Path(res.outputs.out_file)
    assert out.name == ("sub-01_ses-pre_acq-mprage_run-2_space-MNI152NLin2009aSym_res-2_"
                        "desc-preproc_T1w.nii.gz")
    assert out.parent == bids[3] / "sub-01" / "ses-pre" / "anat"
    meta = json.loads(Path(res.outputs.out_meta).read_text())
    assert meta["Sources"] == [f"bids:raw:{SOURCE}", "bids::sub-01/anat/x_xfm.h5"]
    assert meta["SpatialReference"] == "MNI152NLin2009aSym"
    assert meta["Resolution"].startswith("2 mm isotropic MNI152NLin2009aSym grid (2x3x4")
    assert meta["SkullStripped"] is True
    assert meta["Extra"] == 1
    assert np.array_equal(nb.load(out).get_fdata(), nb.load(bids[2]).get_fdata())


def test_masks_carry_type_and_probsegs_no_skullstripped(bids):
    mask = _sink(bids, desc="brain", suffix="mask").run()
    meta = json.loads(Path(mask.outputs.out_meta).read_text())
    assert meta["Type"] == "Brain" and "SkullStripped" not in meta
    assert meta["SpatialReference"] == f"bids:raw:{SOURCE}"  # native grid
    prob = _sink(bids, label="GM", suffix="probseg").run()
    meta = json.loads(Path(prob.outputs.out_meta).read_text())
    assert "SkullStripped" not in meta and "Type" not in meta


def test_required_fields_are_enforced_before_writing(bids):
    with pytest.raises(ValueError, match="SkullStripped"):
        _sink(bids, space="X", res=2, desc="preproc", suffix="T1w").run()
    with pytest.raises(ValueError, match="mask_type"):
        _sink(bids, desc="custom", suffix="mask").run()
    assert not bids[3].exists()


def test_transform_sidecar_has_no_image_fields(bids, tmp_path):
    xfm = tmp_path / "work" / "xfm.h5"
    xfm.write_bytes(b"\x89HDF fake")
    res = _sink(bids, in_file=str(xfm), from_="T1w", to="X", mode="image", suffix="xfm",
                extra_metadata={"Software": "ANTsPy"}).run()
    assert res.outputs.out_file.endswith("_from-T1w_to-X_mode-image_xfm.h5")
    meta = json.loads(Path(res.outputs.out_meta).read_text())
    assert meta == {"Sources": [f"bids:raw:{SOURCE}"], "Software": "ANTsPy"}


def test_uncompressed_input_is_stored_compressed(bids, tmp_path):
    plain = tmp_path / "work" / "plain.nii"
    nb.save(nb.load(bids[2]), plain)
    res = _sink(bids, in_file=str(plain), desc="brain", suffix="mask", extension=".nii.gz").run()
    assert res.outputs.out_file.endswith(".nii.gz")
    assert Path(res.outputs.out_file).read_bytes()[:2] == b"\x1f\x8b"  # gzip magic


def test_failed_copy_leaves_previous_output_and_no_temp_files(bids, monkeypatch):
    first = _sink(bids, desc="brain", suffix="mask").run()
    out = Path(first.outputs.out_file)
    before = out.read_bytes()

    def broken_copy(src, dst):
        Path(dst).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(derivatives.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        _sink(bids, desc="brain", suffix="mask").run()
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, out.name.replace(".nii.gz", ".json")])


def test_sink_node_rewrites_outputs_on_cached_rerun(bids, tmp_path):
    from nipype.pipeline import engine as pe

    bids_dir, source, result, out = bids
    node = pe.Node(DerivativesSink(in_file=str(result), source_file=str(source),
                                   bids_dir=str(bids_dir), output_dir=str(out),
                                   desc="brain", suffix="mask"),
                   name="ds", base_dir=str(tmp_path / "nipype"))
    written = Path(node.run().outputs.out_file)
    written.unlink()
    shutil.rmtree(written.parent)
    node.run()
    assert written.is_file()
