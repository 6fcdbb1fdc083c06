"""The Boutiques descriptor is generated from the real parser and is valid for bosh."""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grazbids import __version__
from grazbids.boutiques import build_descriptor, descriptor_json
from grazbids.cli.parser import build_parser, parse_args
from grazbids.cli.run import main
from grazbids.exitcodes import ExitCode

EXIT_OPTIONS = {"-h", "--help", "--version", "--boutiques"}


def _bosh() -> str:
    pytest.importorskip("boutiques", reason="pip install boutiques (in the [test] extra)")
    found = shutil.which("bosh") or str(Path(sys.executable).parent / "bosh")
    if not Path(found).exists():
        pytest.skip("the bosh command of the boutiques package is not on PATH")
    return found


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return build_descriptor(build_parser())


@pytest.fixture()
def descriptor_file(tmp_path, descriptor) -> Path:
    path = tmp_path / "grazbids.json"
    path.write_text(json.dumps(descriptor, indent=2))
    return path


def test_every_cli_option_appears(descriptor):
    parser = build_parser()
    flags = {entry.get("command-line-flag") for entry in descriptor["inputs"]}
    aliases = {alias for spellings in descriptor["custom"]["grazbids:aliases"].values() for alias in spellings}
    ids = [entry["id"] for entry in descriptor["inputs"]]
    assert len(ids) == len(set(ids)), "input ids must be unique"
    left_out = set()
    for action in parser._actions:
        if not action.option_strings:  # positional: its dest is the input id
            assert action.dest in ids
            continue
        if set(action.option_strings) & EXIT_OPTIONS:
            left_out.update(action.option_strings)
            continue
        for option in action.option_strings:
            assert option in flags | aliases, f"{option} is missing from the Boutiques descriptor"
    # only the options that print something and exit are left out
    assert left_out == EXIT_OPTIONS
    assert len(descriptor["inputs"]) == len(parser._actions) - 3


def test_option_kinds_follow_the_parser(descriptor):
    inputs = {entry["id"]: entry for entry in descriptor["inputs"]}
    assert [inputs[i]["optional"] for i in ("bids_dir", "output_dir", "analysis_level")] == [False] * 3
    assert inputs["analysis_level"]["value-choices"] == ["participant", "group"]
    assert inputs["analysis_level"]["value-requires"]["group"] == ["target_column"]
    assert inputs["bids_dir"]["type"] == "File" and inputs["output_dir"]["type"] == "String"
    assert inputs["skip_bids_validation"]["type"] == "Flag"
    assert inputs["participant_labels"]["list"] is True
    assert inputs["cv_folds"] == {**inputs["cv_folds"], "type": "Number", "integer": True, "minimum": 2}
    assert inputs["device"]["value-choices"] == ["auto", "cpu", "cuda"]
    assert inputs["resolution"]["value-choices"] == [1, 2]
    assert descriptor["tool-version"] == __version__
    assert descriptor["command-line"].startswith("grazbids [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] ")
    for entry in descriptor["inputs"]:
        assert entry["value-key"] in descriptor["command-line"]


def test_error_codes_cover_every_exit_code(descriptor):
    codes = {entry["code"] for entry in descriptor["error-codes"]}
    assert codes >= {int(code) for code in ExitCode if code != ExitCode.OK}


def test_a_new_parser_option_appears_without_editing_the_generator():
    parser = build_parser()
    parser.add_argument("--brand-new-option", type=int, help="added by the test")
    entry = next(e for e in build_descriptor(parser)["inputs"] if e["id"] == "brand_new_option")
    assert entry["command-line-flag"] == "--brand-new-option" and entry["type"] == "Number"


def test_cli_prints_the_descriptor(capsys):
    assert main(["--boutiques"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(descriptor_json(build_parser()))
    assert printed["container-image"] == {"type": "docker", "image": f"grazbids:{__version__}",
                                          "entrypoint": True}


def test_module_entry_point_prints_the_descriptor():
    done = subprocess.run([sys.executable, "-m", "grazbids", "--boutiques"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "grazbids"


def test_bosh_validate(descriptor_file):
    done = subprocess.run([_bosh(), "validate", str(descriptor_file)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


def _simulate(descriptor_file: Path, invocation: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "invocation.json"
    path.write_text(json.dumps(invocation))
    return subprocess.run([_bosh(), "exec", "simulate", str(descriptor_file), "-i", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_bosh_command_line_parses_back(descriptor_file, tmp_path):
    """A command line that bosh builds from an invocation is one the parser accepts."""
    invocation = {
        "bids_dir": str(tmp_path / "bids"), "output_dir": str(tmp_path / "out"),
        "analysis_level": "group", "target_column": "gender",
        "participant_labels": ["01", "sub-02"], "epochs": 1, "cv_folds": 3, "mem_gb": 2.5,
        "modes": ["plain", "grazplus"], "resolution": 1, "skip_bids_validation": True,
        "verbosity": True, "work_dir": str(tmp_path / "work"),
    }
    done = _simulate(descriptor_file, invocation, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    command = done.stdout.split("Generated Command:", 1)[1].strip().splitlines()[0]
    argv = shlex.split(command)
    assert argv[0] == "grazbids"
    config = parse_args(argv[1:])
    assert config.analysis_level == "group" and config.target_column == "gender"
    assert config.participant_labels == ("01", "02")
    assert (config.epochs, config.cv_folds, config.mem_gb, config.resolution) == (1, 3, 2.5, 1)
    assert config.modes == ("plain", "grazplus") and config.skip_bids_validation
    assert config.verbosity == 1 and config.work_dir == tmp_path / "work"


def test_bosh_applies_the_parser_bounds(descriptor_file, tmp_path):
    """--cv-folds needs 2 or more (the parser's _cv_folds); bosh checks invocations against it."""
    def check(cv_folds):
        path = tmp_path / "invocation.json"
        path.write_text(json.dumps({"bids_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
                                    "analysis_level": "group", "target_column": "gender",
                                    "cv_folds": cv_folds}))
        return subprocess.run([_bosh(), "invocation", str(descriptor_file), "-i", str(path)],
                              capture_output=True, text=True, timeout=120)

    assert check(2).returncode == 0
    refused = check(1)
    assert refused.returncode != 0 and "minimum of 2" in refused.stdout + refused.stderr


def test_exit_actions_are_recognised():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--flag", action="store_true")
    ids = [e["id"] for e in build_descriptor(parser, image=None)["inputs"]]
    assert ids == ["flag"]  # -h/--help is left out
