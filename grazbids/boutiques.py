"""Boutiques descriptor of the ``grazbids`` command, generated from the real argparse parser.

BIDS execution platforms (and ``bosh exec``) read a Boutiques descriptor to build command
lines. Writing it by hand lets it drift from the parser; here every input comes from an
argparse action of :func:`grazbids.cli.parser.build_parser`, so a new option appears in the
descriptor (``grazbids --boutiques``) without anyone remembering to add it.

Mapping: positional arguments are required inputs; ``store_true``/``count`` options are
``Flag`` inputs; ``nargs="+"`` options are lists; the integer/float checkers of the parser
become ``Number`` inputs with their bounds; ``Path`` arguments are ``File`` inputs (folders
included), except output locations, which are ``String`` (they need not exist yet);
``choices`` become ``value-choices``. The first long option is the command-line flag; the
other spellings (``--participant_label``) are listed in the input's description and in
``custom["grazbids:aliases"]``. Options
that print something and exit (``--help``, ``--version``, ``--boutiques``) are left out.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from . import __version__
from .config import ANALYSIS_LEVELS
from .exitcodes import ExitCode

SCHEMA_VERSION = "0.5"
# Path arguments that name something grazbids creates: String, not File
OUTPUT_LOCATIONS = ("output_dir", "work_dir")
# Inputs that only the group level needs (value-requires of analysis_level)
GROUP_REQUIRES = ("target_column",)

ERROR_DESCRIPTIONS = {
    ExitCode.FAILURE: "the run finished, but some participant or the group step failed "
                      "(see logs/ and sub-<label>/log/)",
    ExitCode.VALIDATION_FAILED: "the BIDS validator reported errors in the input dataset",
    ExitCode.UNKNOWN_LEVEL: "unknown analysis level (use participant or group)",
    ExitCode.NO_FILES: "the participant/session filters selected no T1w images",
    ExitCode.USAGE: "command-line usage error",
    ExitCode.BAD_DATA: "input data exist but are unusable",
    ExitCode.MISSING_INPUT: "an input file or folder does not exist",
    ExitCode.CANNOT_CREATE_OUTPUT: "the output or work folder cannot be created or written",
    ExitCode.IO_ERROR: "reading or writing failed during the run",
    ExitCode.BUSY: "another grazbids run holds the work folder (or the group outputs); try again later",
    ExitCode.INTERRUPTED: "interrupted (SIGINT); workers stopped, summary written",
    ExitCode.TERMINATED: "terminated (SIGTERM, e.g. a scheduler or docker stop); workers stopped, summary written",
}

# the image that docs/containers.md builds (`docker build -t grazbids:<version> .`)
DEFAULT_IMAGE = f"grazbids:{__version__}"


def _is_exit_action(action: argparse.Action) -> bool:
    """--help, --version, --boutiques: they print something and exit."""
    return isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or (
        getattr(action, "prints_and_exits", False)
    )


def _identifier(action: argparse.Action) -> str:
    ident = action.dest if action.dest and action.dest != argparse.SUPPRESS else action.option_strings[-1]
    return re.sub(r"[^0-9A-Za-z_]", "_", ident.lstrip("-"))


def _flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.dest.replace("_", " ")
    return _flag(action).lstrip("-").replace("-", " ").replace("_", " ")


def _aliases(action: argparse.Action) -> list[str]:
    return [s for s in action.option_strings if s != _flag(action)]


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)  # fills %(default)s like --help does


def _number_bounds(checker) -> dict | None:
    """Boutiques Number fields for the parser's type callables, None for non-numbers."""
    name = getattr(checker, "__name__", "")
    if checker is int:
        return {"integer": True}
    if checker is float:
        return {"integer": False}
    bounds = {
        "_positive_int": {"integer": True, "minimum": 1},
        "_cv_folds": {"integer": True, "minimum": 2},
        "_seed": {"integer": True, "minimum": 0, "maximum": 2**32 - 1},
        "_positive_float": {"integer": False, "minimum": 0, "exclusive-minimum": True},
    }
    return bounds.get(name)


def _input(parser: argparse.ArgumentParser, action: argparse.Action) -> dict:
    ident = _identifier(action)
    entry = {
        "id": ident,
        "name": _name(action),
        "description": _help(parser, action),
        "value-key": f"[{ident.upper()}]",
        "optional": bool(action.option_strings) and not action.required,
    }
    if action.option_strings:
        entry["command-line-flag"] = _flag(action)
        aliases = _aliases(action)
        if aliases:
            entry["description"] += f" (also: {', '.join(aliases)})"

    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
        entry["type"] = "Flag"
        if isinstance(action, argparse._CountAction):
            entry["description"] += " (the flag may be repeated on the command line, e.g. -vv)"
        return entry

    numbers = _number_bounds(action.type)
    if numbers is not None:
        entry["type"] = "Number"
        entry.update(numbers)
    elif action.type is Path:
        entry["type"] = "String" if action.dest in OUTPUT_LOCATIONS else "File"
    else:
        entry["type"] = "String"

    if action.choices is not None:
        entry["value-choices"] = list(action.choices)
    if action.dest == "analysis_level":  # no argparse choices there: 17, not 64, on a bad level
        entry["value-choices"] = list(ANALYSIS_LEVELS)
        entry["value-requires"] = {level: list(GROUP_REQUIRES) if level == "group" else []
                                   for level in ANALYSIS_LEVELS}
    if action.nargs in ("+", "*"):
        entry["list"] = True
        if action.nargs == "+":
            entry["min-list-entries"] = 1
    return entry


def build_descriptor(parser: argparse.ArgumentParser, image: str | None = DEFAULT_IMAGE) -> dict:
    """The Boutiques descriptor (a dict) of ``parser`` (``grazbids.cli.parser.build_parser()``;
    passed in, so that this module never imports the command line that imports it).

    ``image``: the Docker image for ``container-image`` (its entrypoint is ``grazbids``;
    bosh runs the command line through a shell, so either works); None leaves it out.
    """
    actions = [a for a in parser._actions if not _is_exit_action(a)]
    inputs = [_input(parser, a) for a in actions]
    positional = [e for e, a in zip(inputs, actions) if not a.option_strings]
    optional = [e for e, a in zip(inputs, actions) if a.option_strings]
    command_line = " ".join([parser.prog] + [e["value-key"] for e in positional + optional])

    groups = []
    for group in parser._action_groups:
        members = [_identifier(a) for a in group._group_actions if not _is_exit_action(a)]
        if not members or group.title in ("positional arguments", "options", "optional arguments"):
            continue
        groups.append({
            "id": re.sub(r"[^0-9A-Za-z]+", "_", group.title).strip("_").lower(),
            "name": group.title,
            "members": members,
        })

    errors = [{"code": int(code), "description": text} for code, text in ERROR_DESCRIPTIONS.items()]

    descriptor = {
        "name": parser.prog,
        "tool-version": __version__,
        "schema-version": SCHEMA_VERSION,
        "description": parser.description,
        "command-line": command_line,
        "inputs": inputs,
        "groups": groups,
        "output-files": [{
            "id": "derivatives",
            "name": "BIDS derivatives",
            "description": "BIDS derivatives folder: dataset_description.json, sub-<label>/anat "
                           "images and masks in template space, relevance maps and predictions "
                           "(with --model), group/ models and cross-validation tables, logs/",
            "path-template": "[OUTPUT_DIR]",
            "optional": False,
        }],
        "error-codes": errors,
        "tags": {"domain": ["neuroinformatics", "mri", "bids-app", "deep-learning", "explainability"]},
        "custom": {
            "bids-app": True,
            "grazbids:generated-from": "grazbids.cli.parser.build_parser",
            # input id -> the other option strings the parser accepts for it
            "grazbids:aliases": {_identifier(a): _aliases(a) for a in actions if _aliases(a)},
        },
    }
    if image:
        descriptor["container-image"] = {"type": "docker", "image": image, "entrypoint": True}
    return descriptor


def descriptor_json(parser: argparse.ArgumentParser, image: str | None = DEFAULT_IMAGE) -> str:
    return json.dumps(build_descriptor(parser, image=image), indent=2)
