"""Tiny synthetic BIDS datasets and fast stand-ins for the pipeline workflows (CLI tests)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (20, 20, 20)


def brain_like_volume(seed: int, shape=SHAPE) -> np.ndarray:
    """A bright ellipsoid on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    return (inside * 400 + rng.random(shape) * 20).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    """Save ``data`` with the given voxel sizes (header pixdim and affine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spatial = (list(zooms) + [1.0, 1.0, 1.0])[:3]
    img = nib.Nifti1Image(data, np.diag([*spatial, 1.0]))
    img.header.set_zooms((list(zooms) + [1.0] * data.ndim)[: data.ndim])
    img.header.set_xyzt_units("mm", "sec")
    img.to_filename(str(path))
    return path


def write_huge_header(path: Path, shape) -> Path:
    """A small .nii.gz whose header declares ``shape`` (a hostile header: the data would not
    fit into any memory); only a few data bytes follow."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header.set_zooms((1.0,) * len(shape))
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = header.binaryblock + b"\0" * 4 + b"\1" * 1_000_000
    path.write_bytes(gzip.compress(raw))
    return path


def save_sheared(path: Path, shear: float, with_qform: bool = False) -> Path:
    """A brain-like volume whose sform is sheared (x depends on the voxel's j index)."""
    affine = np.eye(4)
    affine[0, 1] = shear
    img = nib.Nifti1Image(brain_like_volume(0), affine)
    img.set_sform(affine, code=1)
    img.set_qform(np.eye(4) if with_qform else None, code=1 if with_qform else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))
    return path


def make_bids(root: Path, subjects=("01", "02", "03"), targets: dict | None = None,
              sessions: tuple[str, ...] = (), doi: str | None = None) -> Path:
    """A dataset that passes bids-validator-deno without errors.

    ``targets`` maps column name -> list of values (one per subject) for participants.tsv.
    """
    root.mkdir(parents=True, exist_ok=True)
    description = {"Name": "Synthetic T1w", "BIDSVersion": "1.10.0", "License": "CC0"}
    if doi:
        description["DatasetDOI"] = doi
    (root / "dataset_description.json").write_text(json.dumps(description))
    (root / "README").write_text("Synthetic dataset for grazbids tests.\n")
    targets = targets or {}
    header = ["participant_id", *targets]
    rows = ["\t".join(header)]
    for index, label in enumerate(subjects):
        rows.append("\t".join([f"sub-{label}", *(str(values[index]) for values in targets.values())]))
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    if targets:
        (root / "participants.json").write_text(json.dumps(
            {column: {"Description": f"test column {column}"} for column in targets}))
    for index, label in enumerate(subjects):
        for session in sessions or (None,):
            folder = root / f"sub-{label}" / (f"ses-{session}/anat" if session else "anat")
            stem = f"sub-{label}" + (f"_ses-{session}" if session else "")
            save_nifti(folder / f"{stem}_T1w.nii.gz", brain_like_volume(index))
            (folder / f"{stem}_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
    return root


def t1w_path(root: Path, label: str) -> Path:
    return root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"


# ------------------------------------------------------------------ fake workflows
def _fake_preprocess(subject, t1w_files, bids_dir, output_dir, template, resolution, fail):
    """Copy the first T1w as the 'template-space' image and threshold it as a mask, with
    the sidecars BIDS requires for them."""
    import json
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    import os
    import time

    time.sleep(float(os.environ.get("GRAZBIDS_FAKE_SLEEP", "0")))  # a slow "registration" (signal tests)
    if fail:
        raise RuntimeError(f"simulated registration failure for sub-{subject}")
    anat = Path(output_dir) / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject}_space-{template}_res-{resolution}"
    img = nib.load(t1w_files[0])
    t1w = anat / f"{stem}_desc-preproc_T1w.nii.gz"
    nib.Nifti1Image(np.asanyarray(img.dataobj).astype("float32"), img.affine).to_filename(str(t1w))
    mask = anat / f"{stem}_desc-brain_mask.nii.gz"
    data = (np.asanyarray(img.dataobj) > 100).astype("uint8")
    nib.Nifti1Image(data, img.affine).to_filename(str(mask))
    sources = [f"bids:raw:{Path(f).relative_to(bids_dir)}" for f in t1w_files]
    resolution_text = f"TemplateFlow res-{resolution} grid"
    t1w.with_name(t1w.name.replace(".nii.gz", ".json")).write_text(json.dumps(
        {"SkullStripped": False, "Resolution": resolution_text, "Sources": sources}))
    mask.with_name(mask.name.replace(".nii.gz", ".json")).write_text(json.dumps(
        {"Type": "Brain", "Resolution": resolution_text, "Sources": sources}))
    return str(t1w), str(mask)


def fake_participant_builder(fail_for=(), calls: list | None = None):
    """Stand-in for grazbids.workflows.participant.init_participant_wf (same signature)."""

    def init_participant_wf(*, subject, t1w_files, bids_dir, output_dir, template, resolution,
                            registration, omp_nthreads, seed, model_dir=None, device="auto", explain=(),
                            explain_target="predicted", name=None):
        from nipype.interfaces import utility as niu
        from nipype.pipeline import engine as pe

        if calls is not None:
            calls.append(dict(subject=subject, t1w_files=t1w_files, model_dir=model_dir,
                              registration=registration, omp_nthreads=omp_nthreads))
        workflow = pe.Workflow(name=name or f"sub_{subject}_wf")
        preprocess = pe.Node(niu.Function(
            input_names=["subject", "t1w_files", "bids_dir", "output_dir", "template", "resolution",
                         "fail"],
            output_names=["t1w_template", "brain_mask_template"],
            function=_fake_preprocess), name="preprocess")
        preprocess.inputs.subject = subject
        preprocess.inputs.t1w_files = t1w_files
        preprocess.inputs.bids_dir = bids_dir
        preprocess.inputs.output_dir = output_dir
        preprocess.inputs.template = template
        preprocess.inputs.resolution = resolution
        preprocess.inputs.fail = subject in fail_for
        # per-participant crash folder, as the real participant workflow does
        preprocess.config = {"execution": {"crashdump_dir": str(Path(output_dir) / f"sub-{subject}" / "log"),
                                           "crashfile_format": "txt"}}
        outputnode = pe.Node(niu.IdentityInterface(fields=["t1w_template", "brain_mask_template"]),
                             name="outputnode")
        workflow.connect(preprocess, "t1w_template", outputnode, "t1w_template")
        workflow.connect(preprocess, "brain_mask_template", outputnode, "brain_mask_template")
        return workflow

    return init_participant_wf


def _fake_train(ready, participants, output_dir, target_column):
    import json
    from pathlib import Path

    out = Path(output_dir) / "group"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fake_training.json"
    path.write_text(json.dumps({"participants": participants, "ready": ready, "target": target_column}))
    return str(path)


def fake_group_builder(calls: list | None = None):
    """Stand-in for grazbids.workflows.group.init_group_wf (same signature)."""

    def init_group_wf(settings, *, checkpoint_dir=None, name="group_wf"):
        from nipype.interfaces import utility as niu
        from nipype.pipeline import engine as pe

        participants, target_column, modes = list(settings.participants), settings.target_column, list(settings.modes)
        output_dir = str(settings.output_dir)

        if calls is not None:
            calls.append(dict(participants=participants, target_column=target_column, modes=modes))
        workflow = pe.Workflow(name=name)
        inputnode = pe.Node(niu.IdentityInterface(fields=["ready"]), name="inputnode")
        train = pe.Node(niu.Function(input_names=["ready", "participants", "output_dir", "target_column"],
                                     output_names=["result"], function=_fake_train), name="train")
        train.inputs.participants = participants
        train.inputs.output_dir = output_dir
        train.inputs.target_column = target_column
        workflow.connect(inputnode, "ready", train, "ready")
        return workflow

    return init_group_wf


def install_fakes(monkeypatch, fail_for=(), participant_calls=None, group_calls=None,
                  check_templates=False):
    """Swap in the fake builders; skip the template lookup unless it is under test."""
    from grazbids.cli import preflight
    from grazbids.workflows import base

    monkeypatch.setattr(base, "load_participant_builder",
                        lambda: fake_participant_builder(fail_for, participant_calls))
    monkeypatch.setattr(base, "load_group_builder", lambda: fake_group_builder(group_calls))
    if not check_templates:
        monkeypatch.setattr(preflight, "check_template", lambda config: None)


def write_model_card(folder: Path, template="MNI152NLin2009aSym", resolution=2, classes=("ad", "cn")) -> Path:
    """A complete model bundle (card + safetensors weights) of a tiny network."""
    from grazbids.engine import Architecture, IntensityNormalisation, build_model, save_bundle

    shape = [97, 115, 97] if resolution == 2 else [193, 229, 193]
    card = {"mode": "grazplus", "seed": 42, "classes": list(classes), "target_column": "dx",
            "input": {"template": template, "resolution": resolution, "grid_shape": shape,
                      "intensity_normalisation": IntensityNormalisation().to_dict()},
            "training_data": {"dataset": "test"}}
    model = build_model(Architecture(tuple(shape), n_classes=len(classes), channels=2, n_blocks=2, dense_units=4))
    return save_bundle(folder, model, card)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


@pytest.fixture(autouse=True)
def restore_thread_settings(monkeypatch):
    """main() sets thread variables (and torch's thread count) for the whole process;
    undo that after each test so other test modules keep their settings."""
    import os
    import sys

    for var in THREAD_VARIABLES:
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:  # registers "absent" so the variable is removed again afterwards
            monkeypatch.setenv(var, "1")
            monkeypatch.delenv(var)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if torch is not None:
        torch.set_num_threads(threads)
