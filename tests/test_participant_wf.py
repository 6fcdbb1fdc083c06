"""The participant workflow: graph, crash files, and a real-data run on sub-01."""
import json
import time

import nibabel as nb
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from grazbids.interfaces.masks import dice
from grazbids.templates import EMBEDDED_TEMPLATE, ensure_embedded_template
from grazbids.workflows.participant import (
    anat_workflow_name,
    init_participant_wf,
    set_crashdump_dir,
)

TPL = EMBEDDED_TEMPLATE


@pytest.fixture(scope="module", autouse=True)
def template_dir(tmp_path_factory):
    home = tmp_path_factory.mktemp("grazbids_templates")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAZBIDS_TEMPLATE_DIR", str(home))
        ensure_embedded_template()
        yield home


@pytest.fixture
def tiny_bids(tmp_path):
    """Two sessions of one participant (images are never read: graph tests only)."""
    files = []
    for ses in ("a", "b"):
        path = tmp_path / "bids" / "sub-07" / f"ses-{ses}" / "anat" / f"sub-07_ses-{ses}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nb.save(nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
        files.append(str(path))
    return tmp_path / "bids", files


def _build(bids_dir, files, output_dir, **kwargs):
    params = dict(subject="07", t1w_files=files, bids_dir=str(bids_dir),
                  output_dir=str(output_dir), template=TPL, resolution=2,
                  registration="affine", omp_nthreads=2, seed=42)
    params.update(kwargs)
    return init_participant_wf(**params)


def test_one_sub_workflow_per_t1w_and_crash_dir_on_every_node(tiny_bids, tmp_path):
    bids_dir, files = tiny_bids
    wf = _build(bids_dir, files, tmp_path / "out")
    assert wf.name == "sub_07_wf"
    names = wf.list_node_names()
    for anat in ("anat_ses_a_wf", "anat_ses_b_wf"):
        assert f"{anat}.register" in names
        assert f"{anat}.ds_t1w_template" in names
        assert f"{anat}.priors_to_native" in names
        assert f"{anat}.tissue_segmentation" in names
        # 4x4x4 voxels of ones are no plausible brain: auto treats them as a head
        assert f"{anat}.brain_extraction" in names and f"{anat}.n4_bias_correction" in names
    assert "outputnode" in names
    crash_dir = str((tmp_path / "out" / "sub-07" / "log").absolute())
    for node in wf._get_all_nodes():
        assert node.config["execution"]["crashdump_dir"] == crash_dir
    register = wf.get_node("anat_ses_a_wf.register")
    assert register.n_procs == 2 and register.inputs.num_threads == 2
    assert register.inputs.random_seed == 42


def test_skull_strip_skip_keeps_the_brain_extracted_branch(tiny_bids, tmp_path):
    bids_dir, files = tiny_bids
    names = _build(bids_dir, files, tmp_path / "out", skull_strip="skip").list_node_names()
    assert "anat_ses_a_wf.native_brain_mask" in names and "anat_ses_a_wf.skullstripped_check" in names
    assert not any("brain_extraction" in n or "n4_bias" in n or "head_to_template" in n for n in names)
    forced = _build(bids_dir, files, tmp_path / "out", skull_strip="force").list_node_names()
    assert "anat_ses_a_wf.ds_t1w_native" in forced and "anat_ses_a_wf.head_to_template" in forced


def test_anat_workflow_names():
    assert anat_workflow_name("sub-01/anat/sub-01_T1w.nii.gz") == "anat_wf"
    assert anat_workflow_name("sub-01_ses-1_acq-mp2_run-3_T1w.nii.gz") == "anat_ses_1_acq_mp2_run_3_wf"


def test_inference_is_fed_when_a_model_is_given(tiny_bids, tmp_path, monkeypatch):
    import grazbids.workflows.inference as inference

    calls = {}

    def fake_inference_wf(*, model_dir, device, bids_dir, output_dir, name="inference_wf"):
        calls.update(model_dir=model_dir, device=device)
        wf = pe.Workflow(name=name)
        fields = ["t1w_template", "brain_mask_template", "reverse_transforms", "t1w_native",
                  "source_file"]
        wf.add_nodes([pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")])
        # the sinks the report section reads
        wf.add_nodes([pe.Node(niu.IdentityInterface(fields=["out_file"]), name=sink)
                      for sink in ("ds_heatmap_template", "ds_heatmap_native", "ds_predictions")])
        return wf

    monkeypatch.setattr(inference, "init_inference_wf", fake_inference_wf)
    bids_dir, files = tiny_bids
    wf = _build(bids_dir, files[:1], tmp_path / "out", model_dir="/models/m1", device="cpu")
    assert calls == {"model_dir": "/models/m1", "device": "cpu"}
    anat = wf.get_node("anat_ses_a_wf")
    sources = {}
    for src, dst, data in anat._graph.edges(data=True):
        if dst.name == "inference_wf":
            for out_field, in_field in data["connect"]:
                sources[in_field] = (src.name, out_field)
    assert sources == {
        "inputnode.t1w_template": ("ds_t1w_template", "out_file"),
        "inputnode.brain_mask_template": ("ds_brain_mask_template", "out_file"),
        "inputnode.reverse_transforms": ("register", "reverse_transforms"),
        "inputnode.t1w_native": ("inputnode", "t1w"),
        "inputnode.source_file": ("inputnode", "t1w"),
    }
    to_section = {in_field: (src.name, out_field) for src, dst, data in anat._graph.edges(data=True)
                  if dst.name == "report_section" for out_field, in_field in data["connect"]}
    assert to_section["heatmap_template"] == ("inference_wf", "ds_heatmap_template.out_file")
    assert to_section["predictions"] == ("inference_wf", "ds_predictions.out_file")
    assert to_section["derivatives"] == ("merge_derivatives", "out")
    into_merge = sorted(src.name for src, dst, data in anat._graph.edges(data=True)
                        if dst.name == "merge_derivatives" for _ in data["connect"])
    assert into_merge.count("inference_wf") == 3 and len(into_merge) == 13  # + the 10 sinks of a head


def test_one_report_per_participant_from_every_t1w_section(tiny_bids, tmp_path):
    bids_dir, files = tiny_bids
    wf = _build(bids_dir, files, tmp_path / "out")
    report = wf.get_node("participant_report")
    assert report.inputs.subject == "07" and report.inputs.output_dir == str(tmp_path / "out")
    merged = {dst: src.name for src, dst_node, data in wf._graph.edges(data=True)
              if dst_node.name == "merge_report_sections" for _, dst in data["connect"]}
    assert merged == {"in1": "anat_ses_a_wf", "in2": "anat_ses_b_wf"}


def _fail(x):
    raise RuntimeError(f"deliberate failure {x}")


def test_crash_files_go_to_the_participant_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inner = pe.Workflow(name="sub_09_wf")
    inner.add_nodes([pe.Node(niu.Function(function=_fail, input_names=["x"]), name="boom")])
    inner.get_node("boom").inputs.x = 1
    log_dir = tmp_path / "out" / "sub-09" / "log"
    set_crashdump_dir(inner, log_dir)
    top = pe.Workflow(name="top", base_dir=str(tmp_path / "work"))
    top.add_nodes([inner])
    with pytest.raises(RuntimeError):
        top.run(plugin="Linear")
    crashes = list(log_dir.glob("crash-*"))
    assert len(crashes) == 1 and "boom" in crashes[0].name
    assert not list(tmp_path.glob("crash-*"))


def _expected_names():
    stems = [f"sub-01_space-{TPL}_res-2_desc-preproc_T1w",
             f"sub-01_space-{TPL}_res-2_desc-brain_mask",
             *(f"sub-01_space-{TPL}_res-2_label-{t}_probseg" for t in ("GM", "WM", "CSF")),
             f"sub-01_space-{TPL}_res-2_dseg",
             "sub-01_desc-brain_mask", "sub-01_dseg",
             *(f"sub-01_label-{t}_probseg" for t in ("GM", "WM", "CSF"))]
    names = [s + ext for s in stems for ext in (".nii.gz", ".json")]
    for xfm in (f"sub-01_from-T1w_to-{TPL}_mode-image_xfm",
                f"sub-01_from-{TPL}_to-T1w_mode-image_xfm"):
        names += [xfm + ".h5", xfm + ".json"]
    return sorted(names)


@pytest.mark.realdata
@pytest.mark.slow  # with the Atropos segmentation at 0.87 mm: > 60 s on 2 shared cores
def test_sub01_affine_res2_end_to_end(real_bids_dir, tmp_path):
    source = real_bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    output_dir, work_dir = tmp_path / "out", tmp_path / "work"

    def run():
        wf = init_participant_wf(subject="01", t1w_files=[str(source)],
                                 bids_dir=str(real_bids_dir), output_dir=str(output_dir),
                                 template=TPL, resolution=2, registration="affine",
                                 omp_nthreads=2, seed=42)
        wf.base_dir = str(work_dir)
        start = time.perf_counter()
        wf.run(plugin="Linear")
        return time.perf_counter() - start

    first = run()
    written = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file())
    assert written == ["sub-01.html"] + [f"sub-01/anat/{name}" for name in _expected_names()]

    anat = output_dir / "sub-01" / "anat"
    t1w = anat / f"sub-01_space-{TPL}_res-2_desc-preproc_T1w.nii.gz"
    mask = anat / f"sub-01_space-{TPL}_res-2_desc-brain_mask.nii.gz"
    assert nb.load(t1w).shape == (97, 115, 97)
    meta = json.loads(t1w.with_name(t1w.name.replace(".nii.gz", ".json")).read_text())
    assert meta["Sources"][0] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert meta["SkullStripped"] is True and meta["SpatialReference"] == TPL
    assert "2 mm isotropic" in meta["Resolution"]
    assert meta["RegistrationQC"]["BrainMaskDice"] >= 0.94
    # the documented Dice: template mask vs registered image > small threshold
    registered = nb.load(t1w).get_fdata()
    threshold = 0.01 * np.percentile(registered[registered > 0], 99)
    assert dice(registered > threshold, nb.load(mask).get_fdata() > 0) >= 0.94
    native_mask = nb.load(anat / "sub-01_desc-brain_mask.nii.gz")
    assert native_mask.shape == nb.load(source).shape
    assert np.allclose(native_mask.affine, nb.load(source).affine, atol=1e-4)
    native_meta = json.loads((anat / "sub-01_desc-brain_mask.json").read_text())
    assert native_meta["Type"] == "Brain"

    # second run over the same work dir: registration is reused, outputs rewritten
    xfm_in_work = next(work_dir.rglob("xfm_moving_to_fixed.h5"))
    stamp = xfm_in_work.stat().st_mtime_ns
    second = run()
    assert xfm_in_work.stat().st_mtime_ns == stamp
    assert second < first
    print(f"sub-01 affine res-2: first run {first:.1f} s, cached rerun {second:.1f} s, "
          f"Dice {meta['RegistrationQC']['BrainMaskDice']}")


def test_the_report_waits_for_the_counterfactual_sinks(tiny_bids, tmp_path):
    """A bundle folder holding a simulator: the report section's barrier collects the eight
    counterfactual sinks too (the section reads their files)."""
    from grazbids.workflows.inference import counterfactual_sink_names

    model_dir = tmp_path / "model"
    (model_dir / "simulator").mkdir(parents=True)
    bids_dir, files = tiny_bids

    def into_merge():
        wf = _build(bids_dir, files[:1], tmp_path / "out", model_dir=str(model_dir), device="cpu")
        anat = wf.get_node("anat_ses_a_wf")
        return sorted(out_field.split(".")[0] for src, dst, data in anat._graph.edges(data=True)
                      if dst.name == "merge_derivatives" and src.name == "inference_wf"
                      for out_field, _ in data["connect"])

    assert into_merge() == ["ds_heatmap_native", "ds_heatmap_template", "ds_predictions"]
    (model_dir / "simulator" / "simulator_card.json").write_text("{}")  # has_simulator reads the name only
    sinks = counterfactual_sink_names(model_dir)
    assert len(sinks) == 8 and into_merge() == sorted(sinks + ("ds_heatmap_native", "ds_heatmap_template",
                                                               "ds_predictions"))
