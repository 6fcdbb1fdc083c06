"""Command line: help, version, option checks, label handling, and complete (fake) runs."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import install_fakes, make_bids, restore_thread_settings  # noqa: F401 (autouse)
from grazbids import __version__
from grazbids.cli.parser import build_parser, default_work_dir, parse_args
from grazbids.cli.run import main
from grazbids.exitcodes import ExitCode, GrazbidsError

REPO = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR)", re.M)


def _error(argv) -> GrazbidsError:
    with pytest.raises(GrazbidsError) as info:
        parse_args(argv)
    return info.value


# ------------------------------------------------------------------ help and version
def test_help_lists_option_groups_and_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("Options for selecting the input data", "Resources and execution",
                 "Spatial normalisation", "Deep learning", "--participant-label",
                 "--participant_label", "--plugin-config", "--target-column", "Exit codes"):
        assert text in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grazbids {__version__}"


def test_python_dash_m_version():
    proc = subprocess.run([sys.executable, "-m", "grazbids", "--version"], capture_output=True,
                          text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"grazbids {__version__}"


def test_console_script_version():
    script = Path(sys.executable).parent / "grazbids"
    if not script.exists():
        pytest.skip("grazbids console script not installed in this environment")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and __version__ in proc.stdout


# ------------------------------------------------------------------ usage errors
def test_unknown_analysis_level_exits_17(tmp_path, capsys):
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "grup"]) == ExitCode.UNKNOWN_LEVEL
    assert "unknown analysis level 'grup'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    [],  # analysis level missing
    ["participant", "--nprocs", "0"],
    ["participant", "--resolution", "3"],
    ["participant", "--registration", "warp"],
    ["participant", "--mode", "fancy"],
    ["participant", "--cv-folds", "1"],
    ["participant", "--random-seed", "-1"],
    ["group", "--target-column", "dx", "--learning-rate", "0"],
    ["group", "--target-column", "dx", "--batch-size", "0"],
    ["participant", "--explain", "gradcam"],  # --explain needs --model
    ["group", "--target-column", "dx", "--architecture", "kondrateva"],  # default mode grazplus
    ["participant", "--explain", "shap", "--model", "m"],
    ["participant", "--no-such-option"],
])
def test_bad_options_exit_64(tmp_path, extra, capsys):
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), *extra]) == ExitCode.USAGE
    assert "error" in capsys.readouterr().err


def test_output_dir_equal_to_bids_dir_is_refused(tmp_path):
    err = _error([str(tmp_path), str(tmp_path), "participant"])
    assert err.code == ExitCode.USAGE and "output_dir is the input dataset" in err.message


def test_output_inside_bids_dir_only_under_derivatives(tmp_path):
    bids = tmp_path / "bids"
    assert _error([str(bids), str(bids / "out"), "participant"]).code == ExitCode.USAGE
    config = parse_args([str(bids), str(bids / "derivatives" / "grazbids"), "participant"])
    assert config.output_dir == bids / "derivatives" / "grazbids"


def test_output_dir_containing_bids_dir_is_refused(tmp_path):
    for parent in (tmp_path, tmp_path.parent):
        err = _error([str(tmp_path / "bids"), str(parent), "participant"])
        assert err.code == ExitCode.USAGE and "contains the input dataset" in err.message


@pytest.mark.parametrize("work", ["bids/work", "out/work"])
def test_work_dir_inside_bids_or_output_is_refused(tmp_path, work):
    err = _error([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / work)])
    assert err.code == ExitCode.USAGE and "work folder" in err.message


def test_default_work_dir(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "derivs" / "grazbids"
    assert default_work_dir(bids, out) == tmp_path / "derivs" / "grazbids_work"
    # <bids>/derivatives/grazbids: the sibling would be inside the dataset -> temp folder,
    # the same one on every run (the Nipype cache is found again)
    inside = bids / "derivatives" / "grazbids"
    work = default_work_dir(bids, inside)
    assert bids not in work.parents and work == default_work_dir(bids, inside)


def test_default_work_dir_when_the_sibling_cannot_be_created(tmp_path, monkeypatch):
    """docker run grazbids /bids /out participant: /out_work is not writable in the image."""
    from grazbids.cli import parser

    can_create = parser.can_create
    assert can_create(tmp_path / "new" / "folder") and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert not can_create(tmp_path / "file" / "sub")
    out = tmp_path / "out"
    monkeypatch.setattr(parser, "can_create", lambda path: path != tmp_path / "out_work")
    work = default_work_dir(tmp_path / "bids", out)
    assert work.name.startswith("grazbids_work_") and work == default_work_dir(tmp_path / "bids", out)
    assert parser.is_temporary_work_dir(work) and not parser.is_temporary_work_dir(tmp_path / "out_work")


def test_temporary_work_dir_in_a_container_is_announced(tmp_path, monkeypatch, capsys):
    from grazbids.cli import parser
    from grazbids.utils import dataset

    install_fakes(monkeypatch)
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    monkeypatch.setattr(parser, "can_create", lambda path: path != tmp_path / "out_work")
    monkeypatch.setattr(parser.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(dataset, "detect_container", lambda: {"Type": "docker"})
    assert main([str(bids), str(out), "participant", "--skip-bids-validation", "--plugin", "Linear"]) == 0
    err = capsys.readouterr().err
    work = default_work_dir(bids, out)
    assert work.parent == tmp_path / "tmp" and (work / "grazbids_wf").is_dir()
    assert f"Work folder: {work} (inside the docker container, lost when it is removed" in err


def test_group_level_requires_target_column(tmp_path):
    err = _error([str(tmp_path / "bids"), str(tmp_path / "out"), "group"])
    assert err.code == ExitCode.USAGE and "--target-column" in err.message


# ------------------------------------------------------------------ labels
def test_participant_labels_with_or_without_prefix(tmp_path):
    config = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "participant",
                         "--participant-label", "sub-01", "02", "01", "--session_label", "ses-pre"])
    assert config.participant_labels == ("01", "02")
    assert config.session_labels == ("pre",)
    alias = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "participant", "--participant_label", "03"])
    assert alias.participant_labels == ("03",)


@pytest.mark.parametrize("label", ["../x", "sub-01/..", "01_a", "sub-", "a b"])
def test_participant_label_with_path_characters_is_refused(tmp_path, label, capsys):
    code = main([str(tmp_path / "b"), str(tmp_path / "o"), "participant", "--participant-label", label])
    assert code == ExitCode.USAGE
    assert "invalid participant label" in capsys.readouterr().err


# ------------------------------------------------------------------ settings
def test_defaults(tmp_path):
    config = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "participant"])
    assert (config.template, config.resolution, config.registration) == ("MNI152NLin2009aSym", 2, "affine")
    assert (config.modes, config.cv_folds, config.epochs, config.random_seed) == (("grazplus",), 5, 60, 42)
    assert config.plugin == "MultiProc" and config.plugin_args["n_procs"] == config.nprocs
    assert 1 <= config.omp_nthreads <= min(8, config.nprocs)
    assert config.device == "auto" and config.model_dir is None
    assert config.training_options == {}  # the engine's defaults


def test_training_options_reach_the_engine_settings(tmp_path):
    from dataclasses import fields

    from grazbids.cli.parser import TRAINING_OPTIONS
    from grazbids.engine import TrainSettings

    assert set(TRAINING_OPTIONS) <= {f.name for f in fields(TrainSettings)}
    config = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "group", "--target-column", "dx",
                         "--learning-rate", "1e-3", "--accumulation-steps", "1", "--relevance-weight", "2",
                         "--warmup-epochs", "3"])
    assert config.training_options == {"learning_rate": 1e-3, "accumulation_steps": 1, "relevance_weight": 2.0,
                                       "warmup_epochs": 3}


def test_resources_and_modes(tmp_path):
    config = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "group", "--target-column", "dx",
                         "--nprocs", "3", "--omp-nthreads", "8", "--mem-gb", "12.5",
                         "--mode", "plain", "grazplus", "plain", "--plugin", "multiproc"])
    assert config.plugin == "MultiProc"
    assert config.plugin_args["n_procs"] == 3 and config.plugin_args["memory_gb"] == 12.5
    assert config.omp_nthreads == 3  # never more threads per node than the pool has
    assert config.modes == ("plain", "grazplus")


def test_linear_plugin_gets_no_pool_arguments(tmp_path):
    config = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "participant", "--plugin", "Linear"])
    assert config.plugin == "Linear" and config.plugin_args == {}


def test_plugin_config_file(tmp_path):
    yml = tmp_path / "slurm.yml"
    yml.write_text("plugin: SLURM\nplugin_args:\n  sbatch_args: '--time=2:00:00 --mem=8G'\n"
                   "  max_jobs: 20\n")
    config = parse_args([str(tmp_path / "b"), str(tmp_path / "o"), "participant", "--plugin-config", str(yml)])
    assert config.plugin == "SLURM"
    assert config.plugin_args == {"sbatch_args": "--time=2:00:00 --mem=8G", "max_jobs": 20}


def test_plugin_config_n_procs_kept_unless_given_on_command_line(tmp_path):
    yml = tmp_path / "mp.yml"
    yml.write_text("plugin: MultiProc\nplugin_args: {n_procs: 2, memory_gb: 4}\n")
    argv = [str(tmp_path / "b"), str(tmp_path / "o"), "participant", "--plugin-config", str(yml)]
    assert parse_args(argv).plugin_args["n_procs"] == 2
    assert parse_args([*argv, "--nprocs", "1"]).plugin_args["n_procs"] == 1


@pytest.mark.parametrize("content,code", [
    ("plugin: [unclosed", ExitCode.USAGE),
    ("plugin_args: {}\n", ExitCode.USAGE),
    ("plugin: Torque\n", ExitCode.USAGE),
    (None, ExitCode.MISSING_INPUT),
])
def test_bad_plugin_config(tmp_path, content, code):
    yml = tmp_path / "plugin.yml"
    if content is not None:
        yml.write_text(content)
    err = _error([str(tmp_path / "b"), str(tmp_path / "o"), "participant", "--plugin-config", str(yml)])
    assert err.code == code and str(yml) in err.message


def test_unknown_plugin(tmp_path):
    assert _error([str(tmp_path / "b"), str(tmp_path / "o"), "participant",
                   "--plugin", "Nope"]).code == ExitCode.USAGE


def test_parser_is_importable_without_heavy_modules():
    code = ("import sys; import grazbids.cli.parser, grazbids.cli.run; "
            "print(any(m in sys.modules for m in ('torch', 'nipype', 'bids', 'ants')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.stdout.strip() == "False", proc.stderr
    assert build_parser().prog == "grazbids"


# ------------------------------------------------------------------ complete runs (fake workflows)
def test_participant_run_end_to_end(tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids")
    out = tmp_path / "out"
    calls = []
    install_fakes(monkeypatch, participant_calls=calls)
    code = main([str(bids), str(out), "participant", "--participant-label", "01", "sub-03",
                 "--skip-bids-validation", "--plugin", "Linear", "-w", str(tmp_path / "work"),
                 "--registration", "rigid", "--omp-nthreads", "1"])
    captured = capsys.readouterr()
    assert code == ExitCode.OK, captured.err
    assert captured.out == ""  # all messages go to stderr
    assert TIMESTAMP.search(captured.err)
    assert [c["subject"] for c in calls] == ["01", "03"]
    assert calls[0]["registration"] == "rigid" and calls[0]["model_dir"] is None
    assert calls[0]["t1w_files"] == [str(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")]
    assert (out / "sub-01" / "anat" / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz").exists()
    assert not (out / "sub-02").exists()
    summary = json.loads(next((out / "logs").glob("*_summary.json")).read_text())
    assert summary["processed"] == ["01", "03"] and summary["failed"] == {} and summary["exit_code"] == 0
    assert (tmp_path / "work" / "grazbids_wf").is_dir()


def test_crash_in_one_participant_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids")
    out = tmp_path / "out"
    install_fakes(monkeypatch, fail_for=("02",))
    code = main([str(bids), str(out), "participant", "--skip-bids-validation", "--nprocs", "2",
                 "-w", str(tmp_path / "work")])  # MultiProc, as in production
    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert "FAILED sub-02" in err
    for label in ("01", "03"):
        assert list((out / f"sub-{label}" / "anat").glob("*_desc-preproc_T1w.nii.gz"))
    summary = json.loads(next((out / "logs").glob("*_summary.json")).read_text())
    assert list(summary["failed"]) == ["sub-02"]
    crash = Path(summary["failed"]["sub-02"]["crashfiles"][0])
    assert crash.parent == out / "sub-02" / "log" and "simulated registration failure" in crash.read_text()


def test_stop_on_first_crash(tmp_path, monkeypatch):
    bids = make_bids(tmp_path / "bids")
    install_fakes(monkeypatch, fail_for=("01",))
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                 "--plugin", "Linear", "--stop-on-first-crash", "-w", str(tmp_path / "work")])
    assert code == ExitCode.FAILURE
    # Linear runs participants in order; the crash of sub-01 ends the run
    assert not (tmp_path / "out" / "sub-03" / "anat").exists()


def test_group_run_reuses_preprocessing_and_waits_for_the_rest(tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04", "05"),
                     targets={"dx": ["ad", "cn", "ad", "cn", "n/a"]})
    out, work = tmp_path / "out", tmp_path / "work"
    participant_calls, group_calls = [], []
    install_fakes(monkeypatch, participant_calls=participant_calls, group_calls=group_calls)
    common = ["--skip-bids-validation", "--plugin", "Linear", "-w", str(work)]
    assert main([str(bids), str(out), "participant", "--participant-label", "01", "02", *common]) == 0
    participant_calls.clear()

    code = main([str(bids), str(out), "group", "--target-column", "dx", "--cv-folds", "2", *common])
    assert code == ExitCode.OK
    # only the missing participants are preprocessed; sub-05 (n/a) not at all
    assert [c["subject"] for c in participant_calls] == ["03", "04"]
    assert group_calls[0]["participants"] == ["01", "02", "03", "04"]
    result = json.loads((out / "group" / "fake_training.json").read_text())
    assert len(result["ready"]) == 2  # the barrier delivered both new participants' outputs
    summary = json.loads(sorted((out / "logs").glob("grazbids_group_*_summary.json"))[-1].read_text())
    assert summary["group_step"] == "finished" and summary["without_target"] == ["05"]
    assert summary["reused_preprocessing"] == ["01", "02"]
    # all preprocessed now: the summary says so instead of "0 of 0 processed participant(s)"
    capsys.readouterr()
    assert main([str(bids), str(out), "group", "--target-column", "dx", "--cv-folds", "2", *common]) == 0
    err = capsys.readouterr().err
    assert "group level: no participant needed preprocessing" in err and "0 of 0" not in err


def test_group_step_not_run_when_preprocessing_fails(tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04"),
                     targets={"dx": ["ad", "cn", "ad", "cn"]})
    install_fakes(monkeypatch, fail_for=("03",))
    code = main([str(bids), str(tmp_path / "out"), "group", "--target-column", "dx", "--cv-folds", "2",
                 "--skip-bids-validation", "--plugin", "Linear", "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert "FAILED sub-03" in err and "group step: not run" in err
    assert not (tmp_path / "out" / "group").exists()


def test_group_with_everything_preprocessed_runs_only_training(tmp_path, monkeypatch):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04"),
                     targets={"dx": ["ad", "cn", "ad", "cn"]})
    out, common = tmp_path / "out", ["--skip-bids-validation", "--plugin", "Linear", "-w", str(tmp_path / "w")]
    participant_calls = []
    install_fakes(monkeypatch, participant_calls=participant_calls)
    assert main([str(bids), str(out), "participant", *common]) == 0
    participant_calls.clear()
    assert main([str(bids), str(out), "group", "--target-column", "dx", "--cv-folds", "2", *common]) == 0
    assert participant_calls == []
    result = json.loads((out / "group" / "fake_training.json").read_text())
    assert len(result["ready"]) == 4


def test_model_is_passed_to_participant_workflows(tmp_path, monkeypatch):
    from cli_helpers import write_model_card

    bids = make_bids(tmp_path / "bids", subjects=("01",))
    model = write_model_card(tmp_path / "model")
    calls = []
    install_fakes(monkeypatch, participant_calls=calls)
    assert main([str(bids), str(tmp_path / "out"), "participant", "--model", str(model),
                 "--skip-bids-validation", "--plugin", "Linear", "-w", str(tmp_path / "w")]) == 0
    assert calls[0]["model_dir"] == str(model)
    citation = (tmp_path / "out" / "logs" / "CITATION.md").read_text()
    assert "relevance map" in citation


def test_threads_are_set_for_nodes(tmp_path, monkeypatch):
    import os

    bids = make_bids(tmp_path / "bids", subjects=("01",))
    install_fakes(monkeypatch)
    assert main([str(bids), str(tmp_path / "out"), "participant", "--omp-nthreads", "1", "--nprocs", "1",
                 "--skip-bids-validation", "--plugin", "Linear", "-w", str(tmp_path / "w")]) == 0
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"


def test_workflow_that_cannot_be_built_is_reported(tmp_path, monkeypatch, capsys):
    from grazbids.workflows import base

    bids = make_bids(tmp_path / "bids", subjects=("01",))
    install_fakes(monkeypatch)

    def missing_module():
        raise ModuleNotFoundError("No module named 'grazbids.workflows.participant'")

    monkeypatch.setattr(base, "load_participant_builder", missing_module)
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                 "--plugin", "Linear", "-w", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert "cannot build the workflow" in err and "0 of 1 processed participant(s) succeeded" in err


@pytest.mark.parametrize("flags,nipype_level", [([], logging.WARNING), (["-v"], logging.INFO),
                                                (["-vv"], logging.DEBUG)])
def test_verbosity_sets_nipype_log_level(tmp_path, monkeypatch, flags, nipype_level):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    install_fakes(monkeypatch)
    assert main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                 "--plugin", "Linear", "-w", str(tmp_path / "w"), *flags]) == 0
    assert logging.getLogger("nipype.workflow").level == nipype_level


def test_real_group_workflow_connects_to_the_barrier(tmp_path, monkeypatch):
    """Build (not run) the group level with the lead's init_group_wf, when it exists."""
    pytest.importorskip("grazbids.workflows.group")
    from dataclasses import replace

    import networkx

    from cli_helpers import fake_participant_builder
    from grazbids.workflows import base

    monkeypatch.setattr(base, "load_participant_builder", fake_participant_builder)
    for folder in ("bids", "out"):
        (tmp_path / folder).mkdir()
    config = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--target-column", "dx"])
    config = replace(config, t1w_files={"01": (tmp_path / "a.nii.gz",), "02": (tmp_path / "b.nii.gz",)},
                     group_participants=("01", "02"))
    workflow = base.init_grazbids_wf(config)
    names = workflow.list_node_names()
    assert "preprocessing_done" in names and "group_wf.train" in names
    assert {"sub_01_wf.preprocess", "sub_02_wf.preprocess"} <= set(names)
    graph = workflow._create_flat_graph()  # Nipype's own view of what runs after what
    barrier = next(n for n in graph.nodes if n.fullname.endswith("preprocessing_done"))
    train = next(n for n in graph.nodes if n.fullname.endswith("group_wf.train"))
    assert networkx.has_path(graph, barrier, train)
    for label in ("01", "02"):
        preprocess = next(n for n in graph.nodes if n.fullname.endswith(f"sub_{label}_wf.preprocess"))
        assert networkx.has_path(graph, preprocess, barrier)


def test_group_workflow_with_explanations_atlas_and_feature_visualisation(tmp_path, monkeypatch):
    from dataclasses import replace

    import networkx

    from cli_helpers import fake_participant_builder
    from grazbids.workflows import base

    monkeypatch.setattr(base, "load_participant_builder", fake_participant_builder)
    for folder in ("bids", "out"):
        (tmp_path / folder).mkdir()
    (tmp_path / "atlas_dseg.nii.gz").write_bytes(b"checked by the preflight, not here")
    config = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--target-column", "dx",
                         "--explain", "gradient", "gradcam", "--atlas", str(tmp_path / "atlas_dseg.nii.gz"),
                         "--feature-visualisation", "50"])
    assert config.feature_visualisation == 50 and config.atlas == tmp_path / "atlas_dseg.nii.gz"
    config = replace(config, t1w_files={"01": (tmp_path / "a.nii.gz",)}, group_participants=("01",))
    graph = base.init_grazbids_wf(config)._create_flat_graph()
    node = {n.fullname.split(".", 1)[-1]: n for n in graph.nodes}
    train, featurevis, report = node["group_wf.train"], node["group_wf.feature_visualisation"], node["group_wf.report"]
    settings = train.inputs.settings  # the whole GroupSettings, built once from the command line
    assert settings["explain"] == ["gradient", "gradcam"] and settings["atlas"] == str(tmp_path / "atlas_dseg.nii.gz")
    assert settings["participants"] == ["01"] and settings["target_column"] == "dx"
    assert featurevis.inputs.iterations == 50
    assert networkx.has_path(graph, train, featurevis) and networkx.has_path(graph, featurevis, report)
    default = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--target-column", "dx",
                          "--feature-visualisation"])
    assert default.feature_visualisation == 200


def test_explain_choices_match_the_library():
    from grazbids.config import EXPLAIN_METHODS
    from grazbids.explain import METHODS
    from grazbids.utils.model_card import LRP_METHODS

    assert set(EXPLAIN_METHODS) == set(METHODS) - {"zplus"}  # z+ is always written with --model
    # the LRP methods that may start from the softmax vector (contrastive explains one class)
    assert set(LRP_METHODS) == {name for name, m in METHODS.items() if m.family == "lrp"} - {"zplus", "contrastive"}


def test_explain_target_is_checked_against_the_model_card(tmp_path):
    from grazbids.exitcodes import GrazbidsError
    from grazbids.utils.model_card import check_explain_target

    (tmp_path / "model_card.json").write_text(json.dumps({"classes": ["control", "patient"]}))
    check_explain_target(tmp_path, ("gradcam",), "patient")
    check_explain_target(tmp_path, ("epsilon",), "softmax")
    for explain, target in ((("gradcam",), "healthy"), (("gradcam",), "softmax")):
        with pytest.raises(GrazbidsError) as err:
            check_explain_target(tmp_path, explain, target)
        assert err.value.code == ExitCode.USAGE


def test_exit_code_table_in_the_docs_matches_the_program():
    """docs/usage.md lists exactly the codes grazbids can return, and so does --help."""
    import re

    text = (REPO / "docs" / "usage.md").read_text().split("## Exit codes", 1)[1]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", text, re.M)}
    assert documented == {int(code) for code in ExitCode}
    epilog = build_parser().epilog
    assert all(f"{int(code)} " in epilog for code in ExitCode)
