"""Atlas regions: relevance shares per region on hand-made maps, names, resampling, bad files."""
import nibabel as nb
import numpy as np
import pytest

from grazbids.evaluate.atlas import AtlasError, load_atlas


def _save(path, data, affine=np.eye(4)):
    nb.save(nb.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _reference(shape=(8, 8, 8)):
    return nb.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))


def test_shares_of_a_hand_made_map(tmp_path):
    labels = np.zeros((8, 8, 8), np.int16)
    labels[:4] = 1
    labels[4:, :4] = 2  # the rest (x >= 4, y >= 4) is outside the atlas
    path = _save(tmp_path / "atlas_dseg.nii.gz", labels)
    (tmp_path / "atlas_dseg.tsv").write_text("index\tname\n1\tleft\n2\tright_front\n")
    atlas = load_atlas(path, _reference())
    heat = np.zeros((8, 8, 8))
    heat[0, 0, 0] = 3.0  # region 1
    heat[5, 1, 1] = 1.0  # region 2
    heat[6, 6, 6] = -5.0  # negative relevance does not count
    shares = atlas.shares(heat)
    assert shares == {"left": 0.75, "right_front": 0.25, "outside_atlas": 0.0}
    assert atlas.volume_fractions() == {"left": 0.5, "right_front": 0.25, "outside_atlas": 0.25}
    assert all(np.isnan(v) for v in atlas.shares(-heat.clip(0)).values())  # no positive relevance


def test_names_without_a_table_and_duplicate_names(tmp_path):
    labels = np.zeros((8, 8, 8), np.int16)
    labels[0] = 3
    labels[1] = 7
    atlas = load_atlas(_save(tmp_path / "a.nii.gz", labels), _reference())
    assert atlas.column_names() == ["region-3", "region-7", "outside_atlas"]
    (tmp_path / "b.tsv").write_text("index\tname\n3\tx\n7\tx\n")
    atlas = load_atlas(_save(tmp_path / "b.nii.gz", labels), _reference())
    assert atlas.column_names() == ["x", "x-7", "outside_atlas"]


def test_an_atlas_on_a_finer_grid_is_resampled_nearest_neighbour(tmp_path):
    fine = np.zeros((16, 16, 16), np.int16)
    fine[:8] = 5  # the left half at 0.5 mm -> the left half of the 1 mm grid
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = -0.25  # voxel centres of the fine grid around those of the coarse one
    atlas = load_atlas(_save(tmp_path / "fine.nii.gz", fine, affine), _reference())
    assert atlas.labels.shape == (8, 8, 8)
    assert set(np.unique(atlas.labels)) == {0, 5}  # labels are never blended
    assert (atlas.labels[:4] == 5).all() and (atlas.labels[4:] == 0).all()


@pytest.mark.parametrize("data, message", [
    (np.zeros((8, 8, 8, 2)), "3D label image"),
    (np.full((8, 8, 8), 0.5), "not a label image"),
    (np.zeros((8, 8, 8)), "no labelled region"),
])
def test_unusable_atlases_are_refused_with_the_file_named(tmp_path, data, message):
    path = _save(tmp_path / "bad.nii.gz", data.astype(np.float32))
    with pytest.raises(AtlasError, match=message) as err:
        load_atlas(path, _reference())
    assert str(path) in str(err.value)


def test_an_unreadable_atlas_is_refused(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti")
    with pytest.raises(AtlasError, match="cannot read"):
        load_atlas(path, _reference())
