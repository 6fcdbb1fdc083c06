"""HTML reports: participant and group reports render from synthetic outputs, are
self-contained, and the Nipype interfaces/workflow nodes write them."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from nipype.pipeline import engine as pe

from grazbids.interfaces.reports import GroupReport, ParticipantReport, ReportSection
from grazbids.reports import discover_t1w_outputs, render_t1w_section, write_group_report, write_participant_report
from grazbids.reports.__main__ import main as reports_main
from grazbids.reports.group import numeric_columns
from report_helpers import TPL, write_group_outputs, write_participant_outputs

PNG = "data:image/png;base64,"


def _assert_self_contained(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text


def test_participant_report_has_every_section_and_embeds_figures(tmp_path):
    out = tmp_path / "out"
    write_participant_outputs(out, dice=0.93)
    outputs = discover_t1w_outputs(out, "sub-01")
    assert len(outputs) == 1 and outputs[0].heatmap and outputs[0].predictions
    assert sorted(outputs[0].probsegs) == ["CSF", "GM", "WM"]
    path = write_participant_report("01", [render_t1w_section(outputs[0], out)], out)
    assert path == out / "sub-01.html"
    text = path.read_text()
    for title in ("Summary", "Registration check", "Input in template space", "Prediction",
                  "Relevance (z+ heat map)", "Derivatives"):
        assert f"<h3>{title}</h3>" in text
    assert text.count(PNG) == 3  # registration, input, heat map
    assert outputs[0].counterfactuals == {} and "Counterfactual" not in text  # no simulator outputs
    _assert_self_contained(text)
    assert "0.9300" in text and "below 0.94" in text  # Dice flagged under the target
    assert "0.877" in text and "ANTsPy test" in text  # P(m) and the xfm sidecar
    assert 'href="group/report.html"' in text
    assert f'href="sub-01/anat/sub-01_space-{TPL}_res-2_desc-zplus_heatmap.nii.gz"' in text
    inside = float(re.search(r"inside the brain mask</th><td>([0-9.]+)<", text).group(1))
    assert 0.5 < inside < 0.9  # one face of the grid (outside the brain) has relevance


def test_participant_report_without_model_has_no_prediction(tmp_path):
    out = tmp_path / "out"
    write_participant_outputs(out, subject="02", with_model=False)
    sections = [render_t1w_section(o, out) for o in discover_t1w_outputs(out, "02")]
    text = write_participant_report("sub-02", sections, out).read_text()
    assert "<h3>Registration check</h3>" in text and text.count(PNG) == 2
    assert "<h3>Prediction</h3>" not in text and "heat map" not in text


def _add_explanation_map(anat, method="gradcam"):
    import nibabel as nb
    import numpy as np

    stem = anat / f"sub-01_space-{TPL}_res-2"
    zplus = nb.load(f"{stem}_desc-zplus_heatmap.nii.gz")
    signed = np.asanyarray(zplus.dataobj) - float(np.asanyarray(zplus.dataobj).mean())  # signed, like gradients
    path = Path(f"{stem}_desc-{method.replace('_', '')}_heatmap.nii.gz")
    nb.save(nb.Nifti1Image(signed.astype(np.float32), zplus.affine), str(path))
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps({"MethodName": method}))
    return path


def test_participant_report_shows_the_explain_maps(tmp_path):
    out = tmp_path / "out"
    anat = write_participant_outputs(out)
    _add_explanation_map(anat, "gradient_x_input")
    (outputs,) = discover_t1w_outputs(out, "01")
    assert list(outputs.explanations) == ["gradientxinput"]
    text = write_participant_report("01", [render_t1w_section(outputs, out)], out).read_text()
    assert "<h3>Explanation: gradient_x_input</h3>" in text and "gradient_x_input map over" in text
    assert text.count(PNG) == 4  # registration, input, z+ and the explanation


def test_report_interfaces_write_the_participant_report(tmp_path):
    out = tmp_path / "out"
    anat = write_participant_outputs(out)
    stem = anat / f"sub-01_space-{TPL}_res-2"
    section = pe.Node(ReportSection(
        source_file="/raw/sub-01/anat/sub-01_T1w.nii.gz", output_dir=str(out),
        t1w_template=f"{stem}_desc-preproc_T1w.nii.gz", t1w_sidecar=f"{stem}_desc-preproc_T1w.json",
        brain_mask_template=f"{stem}_desc-brain_mask.nii.gz",
        probsegs_template=[f"{stem}_label-{t}_probseg.nii.gz" for t in ("GM", "WM", "CSF")],
        heatmap_template=f"{stem}_desc-zplus_heatmap.nii.gz",
        predictions=str(anat / "sub-01_desc-grazplus_predictions.tsv"),
        derivatives=[str(_add_explanation_map(anat))],
    ), name="section", base_dir=str(tmp_path / "work"))
    fragment = section.run().outputs.out_fragment
    report = ParticipantReport(subject="01", output_dir=str(out), sections=[fragment, fragment]).run()
    text = (out / "sub-01.html").read_text()
    assert report.outputs.out_report == str(out / "sub-01.html")
    assert text.count('<section id="sub-01_T1w">') == 2 and text.count(PNG) == 8  # 4 per section
    assert "<h3>Explanation: gradcam</h3>" in text
    assert "in GM" in text and "in WM" in text  # tissue labels parsed from probseg names


def test_group_report_shows_cv_table_curves_confusion_and_explanations(tmp_path):
    out = tmp_path / "out"
    write_group_outputs(out)
    write_participant_outputs(out, subject="01", with_model=False)
    write_participant_report("01", [render_t1w_section(o, out) for o in discover_t1w_outputs(out, "01")], out)
    text = write_group_report(out).read_text()
    for title in ("Overview", "Cross-validation metrics", "Mean z+ relevance per class", "Learning curves",
                  "Confusion matrix", "Explanation metrics", "Participants (out-of-fold)"):
        assert f"<h3>{title}</h3>" in text or f"<h2>{title}</h2>" in text
    assert text.count(PNG) == 5  # class maps, curves, confusion, tissue bars, metric strips
    assert "Counterfactual" not in text  # no --counterfactual outputs
    _assert_self_contained(text)
    for value in ("0.750", "0.625", "0.912", "0.877", "0.688 ± 0.088", "0.667"):  # cv_metrics.tsv/json
        assert value in text
    assert 'href="../sub-01.html"' in text and 'href="../sub-02.html"' not in text  # only existing reports
    assert "relevance_outside_brain" in text and "mean_by_true_label / f / relevance_gm" in text


def test_group_report_without_explanation_files(tmp_path):
    out = tmp_path / "out"
    write_group_outputs(out, explanation=False)
    text = write_group_report(out).read_text()
    assert "Explanation metrics" not in text and text.count(PNG) == 3


def test_group_report_needs_group_results(tmp_path):
    with pytest.raises(ValueError, match="no mode-\\*/cv_metrics.tsv"):
        write_group_report(tmp_path)
    (tmp_path / "group" / "mode-plain").mkdir(parents=True)
    (tmp_path / "group" / "mode-plain" / "cv_metrics.tsv").write_text('a\t"b\n1')
    with pytest.raises(ValueError, match="cv_metrics.tsv: unreadable table"):
        GroupReport(output_dir=str(tmp_path)).run()


def test_numeric_columns_skip_ids_and_keep_booleans():
    frame = pd.DataFrame({"participant_id": ["sub-01"], "fold": [1], "true_label": ["f"],
                          "pointing_game_effect": [True], "roc_auc_effect": [0.7], "note": ["x"],
                          "empty": [float("nan")]})
    assert numeric_columns(frame) == ["pointing_game_effect", "roc_auc_effect"]


def test_command_line_renders_existing_outputs(tmp_path):
    out = tmp_path / "out"
    write_participant_outputs(out, subject="03", with_model=False)
    write_group_outputs(out, explanation=False)
    assert reports_main([str(out)]) == 0
    assert (out / "sub-03.html").exists() and (out / "group" / "report.html").exists()


def test_group_report_reads_what_group_training_writes(tmp_path, monkeypatch):
    from test_group_training import _cohort, _run

    import nibabel as nb
    import numpy as np

    bids, out, participants = _cohort(tmp_path)
    labels = np.zeros((16, 16, 16), np.int16)
    labels[4:8], labels[8:12] = 1, 2
    nb.save(nb.Nifti1Image(labels, np.eye(4)), str(tmp_path / "atlas_dseg.nii.gz"))
    (tmp_path / "atlas_dseg.tsv").write_text("index\tname\n1\tleft_part\n2\tright_part\n")
    _run(bids, out, participants, tmp_path, explain=("gradient",), atlas=tmp_path / "atlas_dseg.nii.gz")
    _group_counterfactual(out / "group" / "mode-grazplus" / "model", bids, out, participants, tmp_path, monkeypatch)
    text = write_group_report(out).read_text()
    # --counterfactual: the simulator's maps, summary and per-region means, as the group level wrote them
    summary = json.loads((out / "group" / "mode-grazplus" / "counterfactual" / "summary.json").read_text())
    section = text[text.index("<h3>Counterfactual simulator (group-mean log-Jacobian)</h3>"):]
    assert section.count(PNG) == 1 and "epochs run (of requested)</th><td>1 (of 1)" in section
    assert f"images / correctly classified (used)</th><td>{summary['n_images']} / " in section
    regions = pd.read_csv(out / "group" / "mode-grazplus" / "counterfactual" / "regions.tsv", sep="\t")
    assert "<h4>Mean log-Jacobian per atlas region</h4>" in section
    for region, n in zip(regions["region"], regions["n_voxels"]):
        assert f'<tr><td>{region}</td><td class="num">{n}</td>' in section
    cv = pd.read_csv(out / "group" / "mode-grazplus" / "cv_metrics.tsv", sep="\t")
    for value in cv["balanced_accuracy"]:
        assert f"{value:.3f}" in text
    for title in ("Learning curves", "Mean z+ relevance per class", "Confusion matrix", "Relevance per atlas region",
                  "Out-of-fold gradient maps", "Mean gradient map per class", "gradient: explanation metrics"):
        assert f"<h3>{title}</h3>" in text
    assert text.count("Relevance per atlas region") == 2 and "left_part" in text  # z+ and gradient
    _assert_self_contained(text)


# --------------------------------------------------------------------------- counterfactual sections
def test_participant_report_shows_the_counterfactual_outputs(tmp_path):
    from report_helpers import write_counterfactual_outputs

    out = tmp_path / "out"
    anat = write_participant_outputs(out)
    write_counterfactual_outputs(anat, remove_flips=False)
    (outputs,) = discover_t1w_outputs(out, "01")
    assert sorted(outputs.counterfactuals) == ["inject", "remove"]
    assert sorted(outputs.counterfactuals["remove"]) == ["T1w", "logjacobian"]
    text = write_participant_report("01", [render_t1w_section(outputs, out)], out).read_text()
    section = text[text.index("<h3>Counterfactual simulation</h3>"):text.index("<h3>Derivatives</h3>")]
    assert section.count(PNG) == 2 and text.count(PNG) == 5  # + original/simulated rows and log-Jacobian rows
    _assert_self_contained(text)
    # the probabilities of the sidecars, before and after each warp
    assert "0.877 → 0.950" in section and "0.877 → 0.800" in section and "0.123 → 0.200" in section
    assert "inject: the classifier already predicted m, where this direction aims" in section  # nothing to flip
    assert '<p class="warn">Note: the remove warp did not flip the decision (m before and after' in section
    assert "log-Jacobian &lt; 0 (blue): the simulator shrinks" in section and "not ground truth" in section
    assert "colour scale ±0.3" in section and "inject 0.12 %; remove 0.12 %" in section  # symmetric; folded
    # a warp that flips the decision: no warning
    write_counterfactual_outputs(anat, remove_flips=True)
    text = render_t1w_section(discover_t1w_outputs(out, "01")[0], out)
    assert "did not flip" not in text and "<td>flips to f</td>" in text and "0.877 → 0.390" in text
    assert "wrong way" not in text
    # an inject warp that moves the decision away from the class it should inject
    meta_path = anat / f"sub-01_space-{TPL}_res-2_desc-inject_logjacobian.json"
    meta = json.loads(meta_path.read_text())
    meta.update(ProbabilitiesAfter={"f": 0.6, "m": 0.4}, PredictedAfter="f")
    meta_path.write_text(json.dumps(meta))
    text = render_t1w_section(discover_t1w_outputs(out, "01")[0], out)
    assert "Note: the inject warp moved the decision the wrong way (m → f; P(m) 0.877 → 0.400)" in text


def test_counterfactual_section_needs_both_files_of_a_direction(tmp_path):
    out = tmp_path / "out"
    anat = write_participant_outputs(out)
    from report_helpers import write_counterfactual_outputs

    written = write_counterfactual_outputs(anat)
    Path(str(written["remove_logjacobian"]).replace(".nii.gz", ".json")).unlink()  # figures stay, a note says so
    text = render_t1w_section(discover_t1w_outputs(out, "01")[0], out)
    assert text.count(PNG) == 5 and "remove: the classifier&#x27;s decisions before and after the warp are not" in text
    written["remove_logjacobian"].unlink()
    (outputs,) = discover_t1w_outputs(out, "01")
    assert list(outputs.counterfactuals) == ["inject"]
    written["inject_T1w"].unlink()
    (outputs,) = discover_t1w_outputs(out, "01")
    assert outputs.counterfactuals == {} and "Counterfactual" not in render_t1w_section(outputs, out)


def test_report_section_interface_finds_the_counterfactual_derivatives(tmp_path):
    from report_helpers import write_counterfactual_outputs

    out = tmp_path / "out"
    anat = write_participant_outputs(out)
    stem = anat / f"sub-01_space-{TPL}_res-2"
    written = write_counterfactual_outputs(anat)
    section = pe.Node(ReportSection(
        source_file="/raw/sub-01/anat/sub-01_T1w.nii.gz", output_dir=str(out),
        t1w_template=f"{stem}_desc-preproc_T1w.nii.gz", brain_mask_template=f"{stem}_desc-brain_mask.nii.gz",
        derivatives=[str(p) for p in written.values()],
    ), name="section", base_dir=str(tmp_path / "work"))
    text = Path(section.run().outputs.out_fragment).read_text()
    assert "<h3>Counterfactual simulation</h3>" in text and text.count(PNG) == 4  # registration, input + 2


def test_group_report_shows_the_counterfactual_maps(tmp_path):
    from report_helpers import write_group_counterfactual

    out = tmp_path / "out"
    mode_dir = write_group_outputs(out, explanation=False)
    write_group_counterfactual(mode_dir)
    text = write_group_report(out).read_text()
    start = text.index("<h3>Counterfactual simulator (group-mean log-Jacobian)</h3>")
    section = text[start:text.index("<h3>Participants (out-of-fold)</h3>")]
    assert section.count(PNG) == 1 and text.count(PNG) == 4
    _assert_self_contained(text)
    assert "training decisions flipped by inject (in sample)</th><td>75.00 %" in section
    assert "Note: the remove warp flipped none" in section and "Note: the inject warp" not in section
    assert "last epoch: hinge</th><td>1.235" in section and "diffeomorphic field</th><td>yes" in section
    assert "colour scale ±0.2" in section and "log-Jacobian &lt; 0 (blue)" in section
    assert "rows: class f: inject (2 images); class m: remove (1 image)" in section
    # regions: the largest |mean log-Jacobian| first, one column per class and direction
    assert section.index("right_ventricle") < section.index("left_hippocampus")
    assert "mean log-Jacobian, class f: inject" in section and "<td>+0.456</td>" in section
    # without the counterfactual folder the report has no such section
    import shutil

    shutil.rmtree(mode_dir / "counterfactual")
    shutil.rmtree(mode_dir / "model")
    assert "Counterfactual" not in write_group_report(out).read_text()


def test_group_counterfactual_section_without_regions_and_summary(tmp_path):
    from grazbids.group.layout import ModeLayout
    from grazbids.reports.counterfactual import group_section
    from report_helpers import write_group_counterfactual

    mode_dir = write_group_outputs(tmp_path, explanation=False)
    folder = write_group_counterfactual(mode_dir, regions=False)
    (folder / "summary.json").unlink()
    html = group_section(ModeLayout(mode_dir))
    assert html.count(PNG) == 1 and "atlas region" not in html
    assert "class f: inject" in html and "class m: remove" in html  # row titles from the file names


def test_an_identity_warp_is_drawn_and_named_as_such(tmp_path):
    """All-zero log-Jacobian maps (a simulator that stayed at the identity) still render."""
    import nibabel as nb
    import numpy as np
    from report_helpers import write_counterfactual_outputs

    out = tmp_path / "out"
    written = write_counterfactual_outputs(write_participant_outputs(out))
    for direction in ("inject", "remove"):
        img = nb.load(written[f"{direction}_logjacobian"])
        nb.save(nb.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), written[f"{direction}_logjacobian"])
    text = render_t1w_section(discover_t1w_outputs(out, "01")[0], out)
    assert text.count(PNG) == 5 and "the maps are 0 everywhere in the brain (the warp is the identity)" in text


def _group_counterfactual(model_dir, bids, out, participants, tmp_path, monkeypatch):
    """The group level's counterfactual step on the toy cohort (a small simulator; the toy
    grid is no template grid, so the reference image is the cohort's own)."""
    import nibabel as nb
    import numpy as np

    from grazbids.counterfactual import group as group_module
    from grazbids.counterfactual import run as run_module

    real_train = run_module.train_simulator
    monkeypatch.setattr(group_module, "train_simulator", lambda *a, **k: real_train(
        *a, **{**k, "field_downsample": 1, "channels": (4, 8), "n_experts": 2}))
    monkeypatch.setattr(group_module, "_reference",
                        lambda output_dir, tpl, res: nb.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)))
    return group_module.group_counterfactual(model_dir, bids_dir=bids, output_dir=out, participants=participants,
                                             epochs=1, seed=0, device="cpu", workdir=tmp_path / "cf_work",
                                             atlas=tmp_path / "atlas_dseg.nii.gz")
