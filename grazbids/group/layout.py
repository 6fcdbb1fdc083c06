"""Where the group level writes: ``output_dir/group/`` and one ``mode-<mode>/`` folder per
training mode. The writers (training, out-of-fold maps, feature visualisation) and the
group report both take their paths from here, so a file name is spelled once.

    group/modes_summary.tsv, group/report.html
    group/mode-<mode>/cv_metrics.tsv|json, oof_predictions.tsv|json
    group/mode-<mode>/explanation_metrics.tsv|json, explanation_summary.json   (z+)
    group/mode-<mode>/regions.tsv|json, regions_summary.tsv                    (z+, --atlas)
    group/mode-<mode>/tpl-<tpl>_res-<r>_class-<c>_desc-meanzplus_heatmap.nii.gz
    group/mode-<mode>/explain-<method>/  (the same explanation files for --explain METHOD)
    group/mode-<mode>/history/fold-<k>_history.tsv, final_history.tsv
    group/mode-<mode>/model/ (bundle), featurevis/ (--feature-visualisation)
    group/mode-<mode>/counterfactual/ (--counterfactual: group-mean log-Jacobian maps, summary.json)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import MODES
from ..explain.targets import method_desc

GROUP_FOLDER = "group"
REPORT_NAME = "report.html"
MEAN_MAP = re.compile(r"^tpl-(?P<tpl>[a-zA-Z0-9]+)_res-(?P<res>[a-zA-Z0-9]+)_class-(?P<cls>[a-zA-Z0-9]+)"
                      r"_desc-mean(?P<desc>[a-zA-Z0-9]+)_heatmap\.nii\.gz$")


def safe_label(label: str) -> str:
    """A class name as a BIDS label (letters and digits only)."""
    return re.sub(r"[^a-zA-Z0-9]", "", label) or "class"


@dataclass(frozen=True)
class ModeLayout:
    root: Path  # group/mode-<mode>

    @property
    def mode(self) -> str:
        return self.root.name.removeprefix("mode-")

    @property
    def cv_metrics_tsv(self) -> Path:
        return self.root / "cv_metrics.tsv"

    @property
    def cv_metrics_json(self) -> Path:
        return self.root / "cv_metrics.json"

    @property
    def oof_predictions_tsv(self) -> Path:
        return self.root / "oof_predictions.tsv"

    @property
    def oof_predictions_json(self) -> Path:
        return self.root / "oof_predictions.json"

    @property
    def history_dir(self) -> Path:
        return self.root / "history"

    def fold_history(self, fold: int) -> Path:
        return self.history_dir / f"fold-{fold}_history.tsv"

    @property
    def final_history(self) -> Path:
        return self.history_dir / "final_history.tsv"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def featurevis_dir(self) -> Path:
        return self.root / "featurevis"

    @property
    def counterfactual_dir(self) -> Path:
        return self.root / "counterfactual"

    def method_dir(self, method: str) -> Path:
        """z+ keeps its historical place in the mode folder; other methods get a subfolder."""
        return self.root if method == "zplus" else self.root / f"explain-{method_desc(method)}"

    def explain_dirs(self) -> list[Path]:
        """``explain-<method>`` folders of the --explain methods."""
        return sorted(p for p in self.root.glob("explain-*") if p.is_dir())

    @staticmethod
    def mean_map(method_dir: Path, template: str, resolution: int, label: str, desc: str) -> Path:
        return method_dir / f"tpl-{template}_res-{resolution}_class-{safe_label(label)}_desc-mean{desc}_heatmap.nii.gz"

    @staticmethod
    def mean_maps(method_dir: Path, desc: str) -> dict[Path, str]:
        """Mean class maps of one method in ``method_dir``: path -> class label."""
        found = {}
        for path in sorted(method_dir.glob(f"tpl-*_desc-mean{desc}_heatmap.nii.gz")):
            match = MEAN_MAP.match(path.name)
            if match and match.group("desc") == desc:
                found[path] = match.group("cls")
        return found


@dataclass(frozen=True)
class GroupLayout:
    output_dir: Path

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / GROUP_FOLDER

    @property
    def modes_summary(self) -> Path:
        return self.root / "modes_summary.tsv"

    @property
    def report(self) -> Path:
        return self.root / REPORT_NAME

    def mode(self, mode: str) -> ModeLayout:
        return ModeLayout(self.root / f"mode-{mode}")

    def trained_modes(self) -> list[ModeLayout]:
        """Mode folders with cross-validation results, in the order plain, masked, grazplus."""
        found = [ModeLayout(p) for p in self.root.glob("mode-*") if (p / "cv_metrics.tsv").exists()]
        return sorted(found, key=lambda m: (MODES.index(m.mode) if m.mode in MODES else len(MODES), m.mode))


def group_layout(output_dir: str | os.PathLike) -> GroupLayout:
    return GroupLayout(Path(output_dir))
