"""Dataset-level files of the derivatives folder: dataset_description.json, .bidsignore and
the citation boilerplate ``logs/CITATION.md``. All are written atomically (temp file in the
same folder, then ``os.replace``) so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..config import RunConfig
from ..exitcodes import ExitCode, GrazbidsError
from .atomic import write_text

PIPELINE_NAME = "grazbids"
BIDS_VERSION = "1.10.0"
CITATION_NAME = "CITATION.md"

# Files the pipelines write that the BIDS schema has no names for (yet): relevance maps,
# predictions, transforms, logs, reports, group-level models and tables. No trailing
# slashes: bids-validator-deno 3.0 does not match "sub-*/log/" against sub-01/log/.
BIDSIGNORE_PATTERNS = (
    "logs",
    "group",
    "figures",
    "sub-*/log",
    "sub-*/figures",
    "*.html",
    "*_heatmap.*",
    "*_predictions.*",
    "*_xfm.*",
)


# ---------------------------------------------------------------- atomic writing
def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file and rename (normal umask permissions)."""
    return write_text(path, text)


# ---------------------------------------------------------------- provenance
def detect_container(root: Path = Path("/")) -> dict | None:
    """``{"Type", "Tag"}`` when running in a container, else None.

    Singularity/Apptainer set APPTAINER_CONTAINER/SINGULARITY_CONTAINER at run time; they
    win over GRAZBIDS_CONTAINER_TYPE, which the Dockerfile bakes in as "docker" and which
    is still set when that image is converted to a .sif file.
    """
    env = os.environ
    singularity_image = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    if singularity_image or (root / "singularity").exists():
        kind = "singularity"
    elif env.get("GRAZBIDS_CONTAINER_TYPE"):
        kind = env["GRAZBIDS_CONTAINER_TYPE"]
    elif (root / ".dockerenv").exists():
        kind = "docker"
    elif (root / "run" / ".containerenv").exists():
        kind = "podman"
    else:
        return None
    container = {"Type": kind}
    tag = env.get("GRAZBIDS_CONTAINER_TAG") or (os.path.basename(singularity_image) if singularity_image else "")
    if tag:
        container["Tag"] = tag
    return container


def code_url() -> str | None:
    """The project URL from the installed package metadata (setup.py ``url=``), if any."""
    try:
        meta = metadata.metadata(PIPELINE_NAME)
    except metadata.PackageNotFoundError:
        return None
    if meta.get("Home-page") and meta["Home-page"] != "UNKNOWN":
        return meta["Home-page"]
    for entry in meta.get_all("Project-URL") or []:
        return entry.split(",", 1)[-1].strip()
    return None


def raw_dataset_link(bids_dir: Path, output_dir: Path) -> str:
    """Relative path when outputs live inside the raw dataset (moves with it), else a file URI."""
    if bids_dir in output_dir.parents:
        return os.path.relpath(bids_dir, output_dir) + "/"
    return bids_dir.as_uri()


def dataset_description(config: RunConfig, source_description: dict) -> dict:
    generated_by = {"Name": PIPELINE_NAME, "Version": __version__}
    url = code_url()
    if url:
        generated_by["CodeURL"] = url
    container = detect_container()
    if container:
        generated_by["Container"] = container

    raw_link = raw_dataset_link(config.bids_dir, config.output_dir)
    source = {"URL": raw_link}
    doi = str(source_description.get("DatasetDOI") or "").strip()
    if doi:
        source["DOI"] = doi if doi.startswith(("doi:", "http://", "https://")) else f"doi:{doi}"
    source_name = source_description.get("Name")
    name = f"grazbids derivatives of {source_name}" if source_name else "grazbids derivatives"
    return {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": raw_link},
    }


def check_output_owner(output_dir: Path) -> None:
    """Refuse (64) to write into another pipeline's derivatives folder."""
    path = output_dir / "dataset_description.json"
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text())
        names = [g.get("Name") for g in existing.get("GeneratedBy", []) if isinstance(g, dict)]
    except (OSError, ValueError, AttributeError):
        names = []
    if names and PIPELINE_NAME not in names:
        raise GrazbidsError(ExitCode.USAGE,
                            f"output_dir {output_dir} holds derivatives of {', '.join(map(str, names))} "
                            f"({path}); give grazbids its own output folder")


def write_bidsignore(output_dir: Path) -> Path:
    """Our patterns, keeping any lines a user added to an existing .bidsignore."""
    path = output_dir / ".bidsignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    lines += [p for p in BIDSIGNORE_PATTERNS if p not in lines]
    return write_text_atomic(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- citation boilerplate
def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


_REGISTRATION_TEXT = {
    "rigid": "a rigid-body (6 degrees of freedom) registration",
    "affine": "an affine (12 degrees of freedom) registration",
    "nonlinear": "an affine registration followed by nonlinear symmetric normalisation (SyN)",
}
_MODE_TEXT = {
    "plain": "a plain CNN on the template-space T1w image",
    "masked": "a CNN on the T1w image multiplied by the brain mask (masked input)",
    "grazplus": ("Graz+ relevance-guided training (Tinauer et al. 2022), in which the loss adds "
                 "to the cross-entropy the negative fraction of layer-wise relevance "
                 "(deep Taylor decomposition, z+ rule) that falls inside the brain mask"),
}
_TEMPLATE_REFERENCES = {
    "MNI152NLin2009aSym": ("the ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al. 2009, "
                           "2011)"),
}

REFERENCES = """\
- Tinauer C, Heber S, Pirpamer L, et al. Interpretable brain disease classification and
  relevance-guided deep learning. Sci Rep 2022;12:20254. doi:10.1038/s41598-022-24541-7
- Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible
  neuroimaging data processing framework in Python. Front Neuroinform 2011;5:13.
  doi:10.3389/fninf.2011.00013
- Ciric R, Thompson WH, Lorenz R, et al. TemplateFlow: FAIR-sharing of multi-scale,
  multi-species brain models. Nat Methods 2022;19:1568-1571. doi:10.1038/s41592-022-01681-2
- Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with
  cross-correlation. Med Image Anal 2008;12(1):26-41. doi:10.1016/j.media.2007.06.004
- Tustison NJ, Cook PA, Holbrook AJ, et al. The ANTsX ecosystem for quantitative biological
  and medical imaging. Sci Rep 2021;11:9068. doi:10.1038/s41598-021-87564-6
- Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average
  age-appropriate brain templates from birth to adulthood. NeuroImage 2009;47(Suppl 1):S102.
  doi:10.1016/S1053-8119(09)70884-5
- Fonov V, Evans AC, Botteron K, et al. Unbiased average age-appropriate atlases for
  pediatric studies. NeuroImage 2011;54(1):313-327. doi:10.1016/j.neuroimage.2010.07.033
- Montavon G, Lapuschkin S, Binder A, Samek W, Mueller KR. Explaining nonlinear
  classification decisions with deep Taylor decomposition. Pattern Recognit 2017;65:211-222.
  doi:10.1016/j.patcog.2016.11.008
- Yarkoni T, Markiewicz CJ, de la Vega A, et al. PyBIDS: Python tools for BIDS datasets.
  J Open Source Softw 2019;4(40):1294. doi:10.21105/joss.01294
"""


def citation_text(config: RunConfig) -> str:
    url = code_url()
    where = f" ({url})" if url else ""
    template = _TEMPLATE_REFERENCES.get(config.template, f"the {config.template} template")
    mm = {1: "1 mm", 2: "2 mm"}.get(config.resolution, f"resolution index {config.resolution}")
    parts = [
        f"# Methods boilerplate (grazbids {__version__})\n",
        "Text to adapt for the methods section of a manuscript; it describes the settings of "
        "the run that wrote it. It is released under CC0: copy it freely, but cite the "
        "references below.\n",
        "## Anatomical preprocessing\n",
        f"Results were obtained with *grazbids* {__version__}{where}, a BIDS App for "
        "relevance-guided deep learning (Graz+; Tinauer et al. 2022) built on "
        f"Nipype {_version('nipype')} (Gorgolewski et al. 2011), with input data queried "
        f"through PyBIDS {_version('pybids')} (Yarkoni et al. 2019). Each T1-weighted (T1w) "
        f"image was aligned to {template}, distributed by TemplateFlow "
        f"{_version('templateflow')} (Ciric et al. 2022), on its {mm} grid "
        f"(TemplateFlow resolution index {config.resolution}), with "
        f"{_REGISTRATION_TEXT[config.registration]} computed with ANTs through antspyx "
        f"{_version('antspyx')} (Avants et al. 2008; Tustison et al. 2021). A brain mask was "
        "produced in the same template space.\n",
    ]
    if config.is_group_level:
        modes = "; ".join(_MODE_TEXT[m] for m in config.modes)
        parts += [
            "## Classification and relevance-guided training\n",
            f"Three-dimensional convolutional neural networks (PyTorch {_version('torch')}) were "
            f"trained to classify the participants.tsv column `{config.target_column}` from the "
            f"template-space images, in the configuration(s): {modes}. Performance was "
            f"estimated with {config.cv_folds}-fold cross-validation split by participant, "
            f"training {config.epochs} epochs per fold, random seed {config.random_seed}.\n",
        ]
    elif config.model_dir is not None:
        parts += [
            "## Prediction and relevance maps\n",
            f"A trained grazbids model ({config.model_dir.name}; PyTorch {_version('torch')}) "
            "predicted each participant's class and produced a relevance map by layer-wise "
            "relevance propagation with deep Taylor decomposition (z+ rule; Montavon et al. "
            "2017), as in Graz+ (Tinauer et al. 2022).\n",
        ]
    parts += ["## References\n", REFERENCES]
    return "\n".join(parts)


def write_dataset_files(config: RunConfig, source_description: dict) -> list[Path]:
    """Write dataset_description.json, .bidsignore and logs/CITATION.md into output_dir."""
    out = config.output_dir
    try:
        return [
            write_text_atomic(out / "dataset_description.json",
                              json.dumps(dataset_description(config, source_description), indent=2) + "\n"),
            write_bidsignore(out),
            write_text_atomic(config.log_dir / CITATION_NAME, citation_text(config)),
        ]
    except OSError as err:
        raise GrazbidsError(ExitCode.CANNOT_CREATE_OUTPUT,
                            f"cannot write dataset files into {out}: {err.strerror or err}") from None
