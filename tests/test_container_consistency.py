"""Fast checks that the Dockerfile, the Apptainer definition, the Boutiques descriptor and the
run configurations agree (no container engine needed)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from grazbids import __version__
from grazbids.boutiques import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DEFFILE = REPO / "singularity" / "grazbids.def"

# Settings that differ on purpose: the def file names its own container type and leaves the
# tag (a build argument of the Docker image) as the image has it.
DEF_ONLY = {"GRAZBIDS_CONTAINER_TYPE": "singularity"}
INHERITED_ENV = {"GRAZBIDS_CONTAINER_TAG"}
REQUIRED_LABELS = {"org.opencontainers.image.title", "org.opencontainers.image.description",
                   "org.opencontainers.image.version"}


# ------------------------------------------------------------------ parsing
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    result, buffer = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, rest = buffer.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        buffer = ""
    return result


def _pairs(arguments: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(arguments))


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)


class Dockerfile:
    def __init__(self, path: Path):
        self.stages: list[dict] = []
        global_args: dict[str, str] = {}
        stage = None
        for keyword, rest in _instructions(path.read_text()):
            if keyword == "FROM":
                stage = {"from": rest, "args": dict(global_args), "env": {}, "labels": {}, "run": []}
                self.stages.append(stage)
            elif keyword == "ARG":
                name, _, default = rest.partition("=")
                target = stage["args"] if stage else global_args
                target[name] = _substitute(shlex.split(default)[0] if default else "", target)
            elif stage is None:
                continue
            elif keyword == "ENV":
                stage["env"].update(_pairs(rest))
            elif keyword == "LABEL":
                stage["labels"].update(_pairs(rest))
            elif keyword in ("ENTRYPOINT", "CMD"):
                stage[keyword.lower()] = json.loads(rest)
            elif keyword in ("USER", "WORKDIR"):
                stage[keyword.lower()] = rest
            elif keyword == "RUN":
                stage["run"].append(rest)
        self.global_args = global_args
        self.final = self.stages[-1]

    def resolved(self, section: str) -> dict[str, str]:
        return {k: _substitute(v, self.final["args"]) for k, v in self.final[section].items()}


def _def_sections(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    header, sections, current = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("%"):
            current = line.split()[0][1:]
            sections[current] = []
        elif current is None:
            if ":" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        elif line.strip() and not line.strip().startswith("#"):
            sections[current].append(line.strip())
    return header, sections


@pytest.fixture(scope="module")
def docker() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def definition():
    return _def_sections(DEFFILE)


# ------------------------------------------------------------------ Dockerfile
def test_dockerfile_base_and_builds(docker):
    assert docker.global_args["BASE_IMAGE"] == "python:3.11-slim"
    assert all(stage["from"].startswith("${BASE_IMAGE}") for stage in docker.stages)
    args = docker.stages[0]["args"]
    assert args["TORCH_SPEC"].startswith("torch==")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # CPU unless asked
    assert "python3 -m venv /opt/venv" in " ".join(docker.stages[0]["run"])


def test_dockerfile_version_matches_the_package(docker):
    assert docker.final["args"]["GRAZBIDS_VERSION"] == __version__
    assert docker.stages[0]["args"]["GRAZBIDS_VERSION"] == __version__
    labels = docker.resolved("labels")
    assert labels["org.opencontainers.image.version"] == __version__
    env = docker.resolved("env")
    assert env["GRAZBIDS_CONTAINER_TYPE"] == "docker"
    # the Boutiques descriptor names the image the docs build
    assert env["GRAZBIDS_CONTAINER_TAG"] == DEFAULT_IMAGE == f"grazbids:{__version__}"


def test_dockerfile_runtime_settings(docker):
    env = docker.resolved("env")
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["GRAZBIDS_TEMPLATE_DIR"] == env["TEMPLATEFLOW_HOME"] == "/opt/templateflow"
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0" and env["NIPYPE_NO_ET"] == "1"  # offline
    assert env["OMP_NUM_THREADS"] == "1"
    assert docker.final["entrypoint"] == ["grazbids"]
    assert docker.final["cmd"] == ["--help"]
    assert docker.final["user"] not in ("", "root", "0")
    assert REQUIRED_LABELS <= set(docker.final["labels"])
    assert "org.opencontainers.image.source" in docker.final["labels"]


def test_dockerignore_keeps_the_context_small():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"  # everything out, then only what the image needs back in
    assert {"!setup.py", "!grazbids", "!wheels"} <= set(lines)
    assert not any(l.startswith("!") and (".venv" in l or ".git" in l or "tests" in l) for l in lines)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_python_dependencies_are_pinned_and_used(docker):
    """An image built next month holds the versions tested now."""
    import importlib.metadata

    pins = _pins(REPO / "constraints.txt")
    assert all(re.fullmatch(r"[\w.]+", v) for v in pins.values()), "exact versions only"
    required = importlib.metadata.requires("grazbids") or []
    for requirement in required:
        if "extra ==" in requirement:
            continue
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ;\[]", requirement)[0]).lower()
        assert name in pins, f"{name} (setup.py) is not pinned in constraints.txt"
    assert "bids-validator-deno" in pins
    # the PyTorch pin and the image's TORCH_SPEC agree; no local version (CPU and CUDA builds)
    assert docker.stages[0]["args"]["TORCH_SPEC"] == f"torch=={pins['torch']}"
    install = " ".join(docker.stages[0]["run"])
    assert install.count("pip install $pins") == 3 and 'pins="-c /src/constraints.txt"' in install
    assert "pip freeze --exclude-editable > /opt/venv/grazbids-pip-freeze.txt" in install
    assert "sha256sum -c" in install  # a given CONSTRAINTS_SHA256 must match the file
    labels = docker.final["labels"]
    assert labels["org.grazbids.python.constraints"] == '"constraints.txt sha256:${CONSTRAINTS_SHA256}"'.strip('"')
    assert "!constraints.txt" in (REPO / ".dockerignore").read_text().splitlines()


def test_pip_mirror_is_used_for_pytorch_too(docker):
    install = " ".join(docker.stages[0]["run"])
    torch_step = install.split('if [ -n "${TORCH_INDEX_URL}" ]; then')[1].split("fi;")[0]
    assert '--extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}"' in torch_step
    assert "https://pypi.org/simple\"" not in torch_step.replace("PIP_INDEX_URL:-https://pypi.org/simple", "")
    assert '${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"}' in torch_step


def test_local_wheels_are_never_committed():
    assert "wheels/" in (REPO / ".gitignore").read_text().splitlines()


def test_documented_docker_calls_name_existing_tags():
    """`docker run grazbids ...` needs grazbids:latest; CUDA builds record their own tag."""
    text = (REPO / "docs" / "containers.md").read_text()
    builds = [" ".join(block.split("\\\n")) for block in re.findall(r"docker build[^`]*?(?:\.\n|\. *$)", text, re.M)]
    assert builds
    assert any("-t grazbids:latest" in b for b in builds)
    for build in builds:
        if "cu1" in build or "cuda" in build:
            tag = re.search(r"-t (grazbids:\S+)", build).group(1)
            assert f"--build-arg IMAGE_TAG={tag}" in build, build
    assert "docker run --rm -v /data/ds:/bids:ro -v /data/out:/out grazbids /bids /out participant" in text
    assert "Apptainer >= 1.2" in text and "Apptainer >= 1.2" in DEFFILE.read_text()


# ------------------------------------------------------------------ Apptainer definition
def test_def_bootstraps_from_the_docker_image(definition):
    header, _ = definition
    assert header["Bootstrap"] == "docker"
    assert header["From"] == "{{ IMAGE }}"


def test_def_environment_agrees(docker, definition):
    _, sections = definition
    exports = {}
    for line in sections["environment"]:
        assert line.startswith("export "), line
        key, _, value = line[len("export "):].partition("=")
        exports[key] = value
    docker_env = docker.resolved("env")
    expected = {k: v for k, v in docker_env.items() if k not in INHERITED_ENV}
    expected.update(DEF_ONLY)
    assert exports == expected
    assert not INHERITED_ENV & set(exports)


def test_def_labels_agree(docker, definition):
    _, sections = definition
    labels = dict(line.split(None, 1) for line in sections["labels"])
    docker_labels = docker.resolved("labels")
    assert REQUIRED_LABELS <= set(labels)
    for key, value in labels.items():
        assert docker_labels.get(key) == value, f"label {key}: def {value!r}, Dockerfile {docker_labels.get(key)!r}"


def test_def_runscript_is_the_entrypoint(docker, definition):
    _, sections = definition
    runscript = "\n".join(sections["runscript"])
    entrypoint = " ".join(docker.final["entrypoint"])
    assert f'exec {entrypoint} "$@"' in runscript
    assert f"exec {entrypoint} {' '.join(docker.final['cmd'])}" in runscript  # no arguments = CMD
    assert any(f"{entrypoint} --version" in line for line in sections["test"])


# ------------------------------------------------------------------ HPC scripts and run configurations
@pytest.mark.parametrize("script", ["slurm_participant_array.sh", "slurm_group_gpu.sh"])
def test_slurm_scripts(script):
    path = REPO / "singularity" / script
    text = path.read_text()
    assert text.startswith("#!/bin/bash")
    assert "--cleanenv" in text and "#SBATCH" in text
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(path)], check=True)
    if "gpu" in script:
        assert "--nv" in text and "--device cuda" in text and "--gres=gpu" in text
    else:
        assert "SLURM_ARRAY_TASK_ID" in text and "participants.tsv" in text


@pytest.mark.parametrize("name", ["slurm.yml", "slurm_gpu.yml", "multiproc.yml", "linear.yml"])
def test_run_configurations_are_accepted(name):
    from grazbids.cli.parser import resolve_plugin

    plugin, args = resolve_plugin(None, REPO / "workflows" / name)
    if plugin == "SLURM":
        assert "sbatch_args" in args
    assert plugin == {"slurm.yml": "SLURM", "slurm_gpu.yml": "SLURM", "multiproc.yml": "MultiProc",
                      "linear.yml": "Linear"}[name]
