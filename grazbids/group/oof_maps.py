"""Out-of-fold explanation maps of one method, collected over the CV folds of the group level.

Each held-out sample gets the map of the fold model that did not train on it; from those
the group level writes the per-class mean map, the per-participant explanation metrics
(brain, tissue classes, known effect/shortcut; grazbids.evaluate.explanation_table) and, with an
atlas, the share of relevance per atlas region.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..evaluate.atlas import Atlas
from ..evaluate.explanation_table import COLUMN_DESCRIPTIONS, participant_row, summarise
from ..utils.atomic import write_json, write_tsv


class OutOfFoldMaps:
    def __init__(self, method: str, samples: list, classes: list[str], shape: tuple[int, ...],
                 atlas: Atlas | None = None):
        self.method, self.samples, self.classes, self.atlas = method, samples, classes, atlas
        self.sums = np.zeros((len(classes), *shape))
        self.counts = np.zeros(len(classes), dtype=int)
        self.rows: list[dict] = [{} for _ in samples]
        self.regions: list[dict] = [{} for _ in samples]

    def add(self, index: int, heatmap: np.ndarray, brain_mask: np.ndarray, extra: dict | None = None) -> None:
        """The out-of-fold map of sample ``index`` (template grid); ``extra``: more columns of
        its row (e.g. the decision dependence, which does not depend on the method)."""
        sample = self.samples[index]
        label = self.classes.index(sample.label)
        self.sums[label] += heatmap
        self.counts[label] += 1
        self.rows[index] = {**participant_row(heatmap, brain_mask, sample.tissues, sample.references), **(extra or {})}
        if self.atlas is not None:
            self.regions[index] = self.atlas.shares(heatmap)

    def class_means(self) -> dict[str, np.ndarray]:
        """Mean map per true class (classes without a held-out sample are left out)."""
        return {c: self.sums[j] / self.counts[j] for j, c in enumerate(self.classes) if self.counts[j]}

    def _ids(self) -> dict[str, list[str]]:
        return {
            "participant_id": [f"sub-{s.participant}" for s in self.samples],
            "session_id": [f"ses-{s.session}" if s.session else "n/a" for s in self.samples],
            "true_label": [s.label for s in self.samples],
        }

    def write_metrics(self, out_dir, predicted: list[str], mode: str) -> None:
        """explanation_metrics.tsv/.json (one row per sample) and explanation_summary.json."""
        columns = [c for c in COLUMN_DESCRIPTIONS if any(c in r for r in self.rows)]
        table = pd.DataFrame({**self._ids(), "predicted_label": predicted,
                              **{c: [r.get(c, np.nan) for r in self.rows] for c in columns}})
        write_tsv(out_dir / "explanation_metrics.tsv", table)
        write_json(out_dir / "explanation_metrics.json", {
            "true_label": {"Description": "target value in participants.tsv"},
            "predicted_label": {"Description": "class with the highest out-of-fold probability"},
            **{c: {"Description": COLUMN_DESCRIPTIONS[c] + f" ({self.method} map of the out-of-fold model, "
                                                          "template space)"} for c in columns},
        })
        write_json(out_dir / "explanation_summary.json",
                   {"mode": mode, "method": self.method, **summarise(self.rows, [s.label for s in self.samples])})

    def write_regions(self, out_dir) -> None:
        """regions.tsv (share of positive relevance per atlas region, one row per sample) and
        regions_summary.tsv (per region: its share of the brain's volume, mean share overall and
        per true class, ranked by the overall mean)."""
        if self.atlas is None:
            return
        names = self.atlas.column_names()
        shares = pd.DataFrame([{n: r.get(n, np.nan) for n in names} for r in self.regions])
        write_tsv(out_dir / "regions.tsv", pd.concat([pd.DataFrame(self._ids()), shares], axis=1))
        volume = self.atlas.volume_fractions()  # of the whole grid: an even map's shares
        labels = np.array([s.label for s in self.samples])
        summary = pd.DataFrame({
            "region": names,
            "volume_fraction": [volume[n] for n in names],
            "mean_relevance_fraction": shares.mean(skipna=True).to_numpy(),
            **{f"mean_relevance_fraction_{c}": shares[labels == c].mean(skipna=True).to_numpy()
               for c in self.classes},
        })
        summary["relevance_over_volume"] = summary["mean_relevance_fraction"] / summary["volume_fraction"].where(
            summary["volume_fraction"] > 0)
        write_tsv(out_dir / "regions_summary.tsv",
             summary.sort_values("mean_relevance_fraction", ascending=False, na_position="last"))
        write_json(out_dir / "regions.json", {
            "Atlas": self.atlas.source, "Method": self.method,
            "Description": "fraction of the positive relevance of each out-of-fold map per atlas region; "
                           "outside_atlas: voxels with label 0",
        })
