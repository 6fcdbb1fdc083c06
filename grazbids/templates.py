"""Standard-space templates, offline.

grazbids never downloads anything at run time. The default template,
``MNI152NLin2009aSym`` (ICBM 2009a nonlinear symmetric), is built on first use from the
ICBM 2009a files that nilearn ships as package data, written with TemplateFlow names into
an embedded TemplateFlow home, and then queried through ``templateflow`` like any other
template. Any other template name is looked up in the user's ``TEMPLATEFLOW_HOME``.

How the embedded maps are derived (see docs/preprocessing.md):

* T1w: nilearn's ``mni_icbm152_t1_tal_nlin_sym_09a`` (already brain-extracted; 0-255).
* brain mask: T1w > 0 with holes filled. The nilearn T1w was masked by the ICBM 2009a
  brain mask (one component, no holes), so this recovers that mask exactly.
* GM, WM: nilearn's probability maps rescaled from 0-255 to [0, 1].
* CSF: the remainder ``1 - GM - WM`` inside the brain mask, clipped to [0, 1] (nilearn
  does not ship the ICBM CSF map; inside the ICBM mask everything that is not GM/WM is CSF).
* res-2: each res-1 map is smoothed with a Gaussian (FWHM sqrt(3) mm: the 2 mm sampling
  kernel minus the 1 mm one, against aliasing) and sampled trilinearly on a 2 mm grid of
  97x115x97 voxels centred on the res-1 field of view, whose voxel centres coincide with
  res-1 voxel centres. The res-2 mask is the resampled res-1 mask > 0.5, holes filled.

templateflow reads ``TEMPLATEFLOW_HOME`` once, when it is first imported, and then
unpacks a skeleton of zero-byte placeholders into that folder if it is empty (a crash on a
read-only folder). ``_import_templateflow`` therefore points an unset
``TEMPLATEFLOW_HOME`` at the embedded home and never lets the import touch an empty user
folder. All queries use a ``TemplateFlowClient`` rooted explicitly at the folder that holds
the template, and zero-byte placeholders are rejected before ``client.get`` could try S3.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nb
import numpy as np

EMBEDDED_TEMPLATE = "MNI152NLin2009aSym"
EMBEDDED_RESOLUTIONS = (1, 2)
TEMPLATE_DIR_ENV = "GRAZBIDS_TEMPLATE_DIR"
TEMPLATEFLOW_HOME_ENV = "TEMPLATEFLOW_HOME"
# Bump when the derivation changes: a cached build with another number is rebuilt.
EMBEDDED_BUILD = 1

# res-2 grid: 97x115x97 voxels of 2 mm, centred on the res-1 field of view.
_RES2_SHAPE = (97, 115, 97)
_RES2_ORIGIN = (-96.0, -132.0, -74.0)

_NILEARN_FILES = {
    "t1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_ICBM_LICENSE = """\
ICBM 2009a Nonlinear Symmetric template (as packaged by nilearn), rearranged by grazbids.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its documentation for
any purpose and without fee is hereby granted, provided that the above copyright notice
appear in all copies. The authors and McGill University make no representations about
the suitability of this software for any purpose. It is provided "as is" without express
or implied warranty. The authors are not responsible for any data loss, equipment damage,
property loss, or injury to subjects or patients resulting from the use or misuse of this
software package.

References: Fonov et al. NeuroImage 54 (2011) 313-327, doi:10.1016/j.neuroimage.2010.07.033;
Fonov et al. NeuroImage 47 (2009) S102, doi:10.1016/S1053-8119(09)70884-5.
"""


class TemplateNotFoundError(FileNotFoundError):
    """A template (or one of its files at a resolution) is not available offline."""


@dataclass(frozen=True)
class TemplateFiles:
    """The files grazbids needs from one template at one resolution."""

    name: str
    resolution: int
    t1w: Path
    brain_mask: Path
    gm: Path
    wm: Path
    csf: Path
    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]

    @property
    def probsegs(self) -> dict[str, Path]:
        return {"GM": self.gm, "WM": self.wm, "CSF": self.csf}

    def resolution_description(self) -> str:
        """Text for the BIDS `Resolution` sidecar field of a `res-` derivative."""
        zooms = "x".join(f"{z:g}" for z in self.zooms)
        return (
            f"{self.name} res-{self.resolution} grid: {zooms} mm voxels, "
            f"{'x'.join(str(s) for s in self.shape)} matrix"
        )


# --------------------------------------------------------------------------- paths
def embedded_template_home() -> Path:
    """Folder of the embedded TemplateFlow home ($GRAZBIDS_TEMPLATE_DIR or ~/.cache)."""
    env = os.environ.get(TEMPLATE_DIR_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/grazbids/templateflow").expanduser().absolute()


def _tpl_file(name: str, resolution: int, tail: str) -> str:
    return f"tpl-{name}/tpl-{name}_res-{resolution}_{tail}"


_EMBEDDED_TAILS = {
    "t1w": "T1w.nii.gz",
    "brain_mask": "desc-brain_mask.nii.gz",
    "gm": "label-GM_probseg.nii.gz",
    "wm": "label-WM_probseg.nii.gz",
    "csf": "label-CSF_probseg.nii.gz",
}


def _embedded_files(home: Path) -> list[Path]:
    files = [home / f"tpl-{EMBEDDED_TEMPLATE}" / "template_description.json"]
    for res in EMBEDDED_RESOLUTIONS:
        files += [home / _tpl_file(EMBEDDED_TEMPLATE, res, t) for t in _EMBEDDED_TAILS.values()]
    return files


def _embedded_is_complete(home: Path) -> bool:
    desc = home / f"tpl-{EMBEDDED_TEMPLATE}" / "template_description.json"
    try:
        build = json.loads(desc.read_text()).get("GrazbidsBuild")
    except (OSError, ValueError):
        return False
    return build == EMBEDDED_BUILD and all(
        f.is_file() and f.stat().st_size > 0 for f in _embedded_files(home)
    )


# --------------------------------------------------------------------------- build
def _nilearn_icbm_path(key: str) -> Path:
    path = Path(str(resources.files("nilearn.datasets") / "data" / _NILEARN_FILES[key]))
    if not path.is_file():
        raise TemplateNotFoundError(
            f"nilearn's packaged ICBM 2009a file {path} is missing; reinstall nilearn "
            f"(>=0.10) or point {TEMPLATE_DIR_ENV} at a folder with a built "
            f"tpl-{EMBEDDED_TEMPLATE}"
        )
    return path


def _res2_affine() -> np.ndarray:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = _RES2_ORIGIN
    return affine


def _to_res2(img: nb.Nifti1Image) -> nb.Nifti1Image:
    """Anti-aliased trilinear resampling of a 1 mm map onto the 2 mm grid."""
    from nilearn.image import resample_img, smooth_img

    smoothed = smooth_img(img, fwhm=np.sqrt(2.0**2 - 1.0**2))
    return resample_img(
        smoothed,
        target_affine=_res2_affine(),
        target_shape=_RES2_SHAPE,
        interpolation="linear",
        force_resample=True,
        copy_header=True,
    )


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)  # 4 = MNI152 space
    img.header.set_sform(affine, code=4)
    nb.save(img, path)


def _fill(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_fill_holes(mask)


def _template_description(shapes: dict[int, tuple], origins: dict[int, tuple]) -> dict:
    return {
        "Identifier": EMBEDDED_TEMPLATE,
        "Name": "ICBM 2009a Nonlinear Symmetric (grazbids offline build from nilearn data)",
        "Authors": ["Vladimir Fonov", "Alan Evans", "Robert McKinstry", "C. Robert Almli",
                    "D. Louis Collins"],
        "Acknowledgements": "ICBM 2009a files as distributed with nilearn "
                            "(nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted).",
        "License": "See LICENSE (McConnell Brain Imaging Centre, permissive with attribution)",
        "ReferencesAndLinks": [
            "https://doi.org/10.1016/j.neuroimage.2010.07.033",
            "https://doi.org/10.1016/S1053-8119(09)70884-5",
            "http://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
        ],
        "TemplateFlowVersion": "1.0.0",
        "GrazbidsBuild": EMBEDDED_BUILD,
        "Derivation": {
            "T1w": "nilearn ICBM 2009a T1 (brain-extracted), intensities 0-255",
            "desc-brain_mask": "T1w > 0, holes filled (recovers the ICBM 2009a brain mask)",
            "label-GM_probseg": "nilearn ICBM 2009a GM / 255",
            "label-WM_probseg": "nilearn ICBM 2009a WM / 255",
            "label-CSF_probseg": "clip(1 - GM - WM, 0, 1) inside the brain mask",
            "res-2": "Gaussian FWHM sqrt(3) mm, trilinear onto the 2 mm grid; "
                     "mask = resampled mask > 0.5, holes filled",
        },
        "res": {
            str(r): {
                "origin": list(origins[r]),
                "shape": list(shapes[r]),
                "zooms": [float(r)] * 3,
            }
            for r in EMBEDDED_RESOLUTIONS
        },
    }


def _build_embedded(dest: Path) -> None:
    """Write tpl-MNI152NLin2009aSym (res-1 and res-2) into the folder `dest`."""
    t1_img = nb.load(_nilearn_icbm_path("t1w"))
    affine1 = t1_img.affine
    t1 = np.asanyarray(t1_img.dataobj).astype(np.float32)
    gm = np.asanyarray(nb.load(_nilearn_icbm_path("gm")).dataobj).astype(np.float32) / 255.0
    wm = np.asanyarray(nb.load(_nilearn_icbm_path("wm")).dataobj).astype(np.float32) / 255.0
    mask = _fill(t1 > 0)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask

    maps1 = {"t1w": t1, "gm": gm, "wm": wm, "csf": csf}
    _save(t1, affine1, dest / Path(_tpl_file(EMBEDDED_TEMPLATE, 1, "T1w.nii.gz")).name, np.uint8)
    _save(mask, affine1, dest / Path(_tpl_file(EMBEDDED_TEMPLATE, 1, _EMBEDDED_TAILS["brain_mask"])).name, np.uint8)
    for key in ("gm", "wm", "csf"):
        _save(maps1[key], affine1, dest / Path(_tpl_file(EMBEDDED_TEMPLATE, 1, _EMBEDDED_TAILS[key])).name, np.float32)

    affine2 = _res2_affine()
    for key in ("t1w", "gm", "wm", "csf"):
        data2 = _to_res2(nb.Nifti1Image(maps1[key], affine1)).get_fdata(dtype=np.float32)
        if key != "t1w":
            data2 = np.clip(data2, 0.0, 1.0)
        _save(data2, affine2, dest / Path(_tpl_file(EMBEDDED_TEMPLATE, 2, _EMBEDDED_TAILS[key])).name, np.float32)
    mask2 = _to_res2(nb.Nifti1Image(mask.astype(np.float32), affine1)).get_fdata() > 0.5
    _save(_fill(mask2), affine2, dest / Path(_tpl_file(EMBEDDED_TEMPLATE, 2, _EMBEDDED_TAILS["brain_mask"])).name, np.uint8)

    description = _template_description(
        shapes={1: t1.shape, 2: _RES2_SHAPE},
        origins={1: tuple(float(v) for v in affine1[:3, 3]), 2: _RES2_ORIGIN},
    )
    (dest / "template_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (dest / "LICENSE").write_text(_ICBM_LICENSE)


def _write_home_description(home: Path) -> None:
    """TemplateFlow homes carry a dataset_description.json; pybids likes one too."""
    target = home / "dataset_description.json"
    if target.is_file():
        return
    content = {
        "Name": "grazbids embedded TemplateFlow home (offline)",
        "BIDSVersion": "1.11.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "grazbids"}],
    }
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".dataset_description.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(content, fh, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def ensure_embedded_template(home: Path | None = None) -> Path:
    """Build the embedded template into `home` unless a complete build is there.

    The build goes into a temporary sibling folder that is renamed into place, so
    concurrent processes (e.g. Nipype workers) never see a half-written template.
    Returns the TemplateFlow home folder.
    """
    home = Path(home) if home is not None else embedded_template_home()
    if _embedded_is_complete(home):
        return home
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TemplateNotFoundError(
            f"cannot create the grazbids template folder {home} ({exc}); set "
            f"{TEMPLATE_DIR_ENV} to a writable folder (or one with a built "
            f"tpl-{EMBEDDED_TEMPLATE})"
        ) from exc
    final = home / f"tpl-{EMBEDDED_TEMPLATE}"
    staging = Path(tempfile.mkdtemp(dir=home, prefix=f".tpl-{EMBEDDED_TEMPLATE}.build-"))
    try:
        _build_embedded(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the template is shared data
        if final.exists() and not _embedded_is_complete(home):
            # An old or broken build: move it aside first (rename is atomic).
            stale = Path(tempfile.mkdtemp(dir=home, prefix=f".tpl-{EMBEDDED_TEMPLATE}.stale-"))
            os.rename(final, stale / final.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process renamed its complete build into place first.
            if not _embedded_is_complete(home):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_home_description(home)
    return home


# --------------------------------------------------------------------------- query
def _folder_has_content(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _import_templateflow():
    """Import templateflow without letting its import write into an empty folder."""
    if "templateflow" in sys.modules:
        return sys.modules["templateflow"]
    embedded = ensure_embedded_template()
    user_home = os.environ.get(TEMPLATEFLOW_HOME_ENV)
    # Offline: never refresh the skeleton from the internet.
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    if user_home is None:
        # No user choice: the global templateflow.api serves the embedded home, in this
        # process and in every subprocess that inherits the environment.
        os.environ[TEMPLATEFLOW_HOME_ENV] = str(embedded)
        import templateflow
    elif _folder_has_content(Path(user_home)):
        import templateflow
    else:
        # An empty/missing user home would get a skeleton of zero-byte placeholders
        # unpacked into it at import; import against the embedded home instead.
        os.environ[TEMPLATEFLOW_HOME_ENV] = str(embedded)
        try:
            import templateflow
        finally:
            os.environ[TEMPLATEFLOW_HOME_ENV] = user_home
    return templateflow


@functools.lru_cache(maxsize=8)
def _client(root: Path):
    """One TemplateFlow client (and pybids index) per template home and process."""
    _import_templateflow()
    from templateflow.client import TemplateFlowClient

    return TemplateFlowClient(root=root, autoupdate=False)


_USER_QUERIES = {
    # key: list of alternative queries, first match wins
    "t1w": [dict(suffix="T1w", desc="brain"), dict(suffix="T1w", desc=None)],
    "brain_mask": [dict(suffix="mask", desc="brain")],
    "gm": [dict(suffix="probseg", label="GM", desc=None)],
    "wm": [dict(suffix="probseg", label="WM", desc=None)],
    "csf": [dict(suffix="probseg", label="CSF", desc=None)],
}


def _expected_names(name: str, resolution: int) -> list[str]:
    return [
        _tpl_file(name, resolution, "T1w.nii.gz") + " (or _desc-brain_T1w.nii.gz)",
        _tpl_file(name, resolution, "desc-brain_mask.nii.gz"),
        _tpl_file(name, resolution, "label-GM_probseg.nii.gz"),
        _tpl_file(name, resolution, "label-WM_probseg.nii.gz"),
        _tpl_file(name, resolution, "label-CSF_probseg.nii.gz"),
    ]


def _how_to_provide(name: str, resolution: int, home: Path | str | None) -> str:
    files = "\n  ".join(_expected_names(name, resolution))
    return (
        f"grazbids works offline and needs these files of template '{name}' in "
        f"${TEMPLATEFLOW_HOME_ENV} (now: {home or 'unset'}):\n  {files}\n"
        f"(TemplateFlow zero-padded names such as res-0{resolution} are fine). On a machine "
        f"with network run: python -c \"from templateflow import api; "
        f"api.get('{name}', resolution={resolution}, extension='.nii.gz')\", copy that "
        f"TemplateFlow home here and set {TEMPLATEFLOW_HOME_ENV} to it (for containers: "
        f"APPTAINERENV_{TEMPLATEFLOW_HOME_ENV}). Or use the embedded '{EMBEDDED_TEMPLATE}'."
    )


def _query(client, name: str, resolution: int, key: str, home: Path) -> Path:
    for query in _USER_QUERIES[key]:
        found = client.ls(name, resolution=resolution, extension=".nii.gz",
                          atlas=None, cohort=None, hemi=None, space=None, **query)
        if len(found) > 1:
            raise TemplateNotFoundError(
                f"ambiguous {key} for template '{name}' res-{resolution} in {home}: "
                + ", ".join(str(f) for f in found)
            )
        if found:
            path = Path(found[0])
            if not path.is_file() or path.stat().st_size == 0:
                raise TemplateNotFoundError(
                    f"{path} is a zero-byte TemplateFlow placeholder (never downloaded). "
                    + _how_to_provide(name, resolution, home)
                )
            return path
    raise TemplateNotFoundError(
        f"no {key} file for template '{name}' at res-{resolution} in {home}. "
        + _how_to_provide(name, resolution, home)
    )


def _lookup(name: str, resolution: int, home: Path) -> TemplateFiles:
    client = _client(home)
    paths = {key: _query(client, name, resolution, key, home) for key in _USER_QUERIES}
    header = nb.load(paths["t1w"]).header
    return TemplateFiles(
        name=name,
        resolution=int(resolution),
        shape=tuple(int(s) for s in header.get_data_shape()[:3]),
        zooms=tuple(float(z) for z in header.get_zooms()[:3]),
        **paths,
    )


def get_template(name: str = EMBEDDED_TEMPLATE, resolution: int = 2) -> TemplateFiles:
    """Files of template `name` at `resolution` (TemplateFlow's res- index), offline.

    The embedded `MNI152NLin2009aSym` (res 1 and 2) is always available; other names
    must be present in the user's $TEMPLATEFLOW_HOME. Raises TemplateNotFoundError
    naming the files to provide otherwise.
    """
    resolution = int(resolution)
    if name == EMBEDDED_TEMPLATE:
        if resolution not in EMBEDDED_RESOLUTIONS:
            raise TemplateNotFoundError(
                f"the embedded {EMBEDDED_TEMPLATE} has resolutions "
                f"{list(EMBEDDED_RESOLUTIONS)} (1 mm, 2 mm), not res-{resolution}"
            )
        return _lookup(name, resolution, ensure_embedded_template())

    user_home = os.environ.get(TEMPLATEFLOW_HOME_ENV)
    home = Path(user_home).expanduser().absolute() if user_home else None
    if home is None or not (home / f"tpl-{name}").is_dir():
        where = f"{home}/tpl-{name}" if home else f"${TEMPLATEFLOW_HOME_ENV} is unset"
        raise TemplateNotFoundError(
            f"template '{name}' not found ({where}). " + _how_to_provide(name, resolution, home)
        )
    return _lookup(name, resolution, home)
