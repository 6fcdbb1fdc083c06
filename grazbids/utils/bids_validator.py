"""Run the offline BIDS validator (``bids-validator-deno``) and read its JSON report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

VALIDATOR_NAME = "bids-validator-deno"


@dataclass
class ValidationReport:
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    @staticmethod
    def describe(issue: dict) -> str:
        """One line per issue: code[/subCode] at location[:line]: message."""
        code = issue.get("code", "?")
        if issue.get("subCode"):
            code += f"/{issue['subCode']}"
        where = issue.get("location", "")
        if issue.get("line") is not None:
            where += f":{issue['line']}"
        message = " ".join(str(issue.get("issueMessage", "")).split())[:200]
        explanation = issue.get("codeMessage", "")
        if explanation:
            message = f"{message} ({explanation})" if message else explanation
        text = f"{code} at {where}" if where else code
        return f"{text}: {message}" if message else text

    def warning_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for issue in self.warnings:
            key = issue.get("code", "?")
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class ValidatorUnavailable(RuntimeError):
    """The validator is not installed or could not produce a report."""


def find_validator() -> str | None:
    """The executable on PATH, or beside this Python (a virtualenv run without activating it)."""
    found = shutil.which(VALIDATOR_NAME)
    if found:
        return found
    beside = Path(sys.executable).parent / VALIDATOR_NAME
    return str(beside) if beside.exists() else None


def run_validator(bids_dir: Path, timeout_s: float | None = None) -> ValidationReport:
    executable = find_validator()
    if executable is None:
        raise ValidatorUnavailable(
            f"{VALIDATOR_NAME} not found (pip install bids-validator-deno), "
            "or pass --skip-bids-validation"
        )
    try:
        proc = subprocess.run(
            [executable, "--format", "json", "--no-color", str(bids_dir)],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValidatorUnavailable(f"{VALIDATOR_NAME} could not run: {err}") from None
    return parse_report(proc.stdout, proc.stderr, proc.returncode)


def parse_report(stdout: str, stderr: str = "", returncode: int = 0) -> ValidationReport:
    """Split the validator's JSON issues by severity (3.x layout: issues.issues[])."""
    try:
        data = json.loads(stdout)
        issues = data["issues"]["issues"]
        explanations = data["issues"].get("codeMessages") or {}
    except (json.JSONDecodeError, KeyError, TypeError):
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise ValidatorUnavailable(
            f"{VALIDATOR_NAME} exited with {returncode} without a JSON report: " + " | ".join(tail)
        ) from None
    report = ValidationReport()
    for issue in issues:
        if issue.get("code") in explanations:
            issue = {**issue, "codeMessage": explanations[issue["code"]]}
        severity = issue.get("severity")
        if severity == "error":
            report.errors.append(issue)
        elif severity == "warning":
            report.warnings.append(issue)
    return report
