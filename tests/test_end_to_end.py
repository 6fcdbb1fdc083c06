"""The BIDS App on one real subject, through the command line, with a model bundle.

Checks the exact list of output files (as sMRIPrep's CI does, against
tests/data/expected_outputs_participant.txt), that the derivatives validate with
bids-validator-deno, and that pybids finds the heat maps by `desc`.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from grazbids.cli.run import main
from grazbids.engine import Architecture, IntensityNormalisation, build_model, save_bundle
from grazbids.utils.bids_validator import run_validator

TPL = "MNI152NLin2009aSym"
EXPECTED = Path(__file__).parent / "data" / "expected_outputs_participant.txt"


def _untrained_bundle(path: Path) -> Path:
    """A real bundle for the 2 mm template grid (weights untrained: only the plumbing is tested)."""
    torch.manual_seed(0)
    model = build_model(Architecture((97, 115, 97)))
    card = {
        "mode": "grazplus", "seed": 0, "classes": ["f", "m"], "target_column": "gender",
        "input": {"template": TPL, "resolution": 2, "grid_shape": [97, 115, 97],
                  "intensity_normalisation": IntensityNormalisation().to_dict()},
        "training_data": {"dataset": "none (test bundle)", "n_per_class": {"f": 0, "m": 0}},
    }
    return save_bundle(path, model, card)


def _listing(root: Path) -> list[str]:
    # run logs carry a timestamp in their names: compared by folder only
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "logs")


@pytest.mark.realdata
def test_participant_level_with_model_on_a_real_subject(real_bids_dir, tmp_path):
    out = tmp_path / "out"
    bundle = _untrained_bundle(tmp_path / "model")
    code = main([str(real_bids_dir), str(out), "participant", "--participant-label", "01",
                 "--skip-bids-validation", "--model", str(bundle), "--device", "cpu",
                 "--explain", "gradcam", "gradient_x_input", "--explain-target", "m",
                 "--nprocs", "2", "-w", str(tmp_path / "work")])
    assert code == 0

    assert _listing(out) == EXPECTED.read_text().split()
    assert (out / "logs" / "CITATION.md").exists()

    anat = out / "sub-01" / "anat"
    predictions = pd.read_csv(anat / "sub-01_desc-grazplus_predictions.tsv", sep="\t")
    assert predictions.loc[0, ["probability_f", "probability_m"]].sum() == pytest.approx(1, abs=1e-5)
    assert predictions.loc[0, "predicted_label"] in ("f", "m")
    import nibabel as nb

    heat = nb.load(str(anat / f"sub-01_space-{TPL}_res-2_desc-zplus_heatmap.nii.gz")).get_fdata()
    assert heat.shape == (97, 115, 97) and heat.min() >= 0
    assert heat.sum() == pytest.approx(1.0, rel=1e-3)  # conservation on the template grid
    native = nb.load(str(anat / "sub-01_desc-zplus_heatmap.nii.gz"))
    assert native.shape == nb.load(str(real_bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz")).shape
    meta = json.loads((anat / f"sub-01_space-{TPL}_res-2_desc-zplus_heatmap.json").read_text())
    assert meta["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert "z+" in meta["Method"] and meta["ExplainedClass"].startswith("softmax")

    for method, desc in (("gradcam", "gradcam"), ("gradient_x_input", "gradientxinput")):
        extra = nb.load(str(anat / f"sub-01_space-{TPL}_res-2_desc-{desc}_heatmap.nii.gz")).get_fdata()
        assert extra.shape == (97, 115, 97) and np.isfinite(extra).all() and np.abs(extra).sum() > 0
        sidecar = json.loads((anat / f"sub-01_desc-{desc}_heatmap.json").read_text())
        assert sidecar["MethodName"] == method and sidecar["ExplainedClass"] == "m"
        assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert nb.load(str(anat / "sub-01_desc-gradcam_heatmap.nii.gz")).shape == native.shape

    report = run_validator(out)
    assert report.errors == [], [report.describe(e) for e in report.errors]

    from bids import BIDSLayout

    layout = BIDSLayout(str(out), validate=False)
    maps = layout.get(subject="01", desc="zplus", extension=".nii.gz", return_type="filename")
    assert sorted(Path(m).name for m in maps) == ["sub-01_desc-zplus_heatmap.nii.gz",
                                                 f"sub-01_space-{TPL}_res-2_desc-zplus_heatmap.nii.gz"]
    assert np.isfinite(native.get_fdata()).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_participant_level_with_a_counterfactual_simulator_and_its_report(real_bids_dir, tmp_path):
    """A bundle that holds a simulator (untrained: the plumbing is tested): the simulated
    images, fields and log-Jacobian maps are written, and the participant report shows them
    with the probabilities of their sidecars."""
    from grazbids.counterfactual import ConditionalUNet, SimulatorArchitecture, save_simulator
    from grazbids.counterfactual.bundle import classifier_hash

    out = tmp_path / "out"
    bundle = _untrained_bundle(tmp_path / "model")
    torch.manual_seed(0)
    save_simulator(bundle, ConditionalUNet(SimulatorArchitecture((97, 115, 97))),
                   {"classifier": {"sha256": classifier_hash(bundle), "positive_class": "m"}})
    code = main([str(real_bids_dir), str(out), "participant", "--participant-label", "01",
                 "--skip-bids-validation", "--model", str(bundle), "--device", "cpu",
                 "--nprocs", "2", "-w", str(tmp_path / "work")])
    assert code == 0
    anat = out / "sub-01" / "anat"
    stem = f"sub-01_space-{TPL}_res-2"
    for direction in ("inject", "remove"):
        for kind in ("T1w", "displacement", "logjacobian"):
            assert (anat / f"{stem}_desc-{direction}_{kind}.nii.gz").is_file()
        assert (anat / f"sub-01_desc-{direction}_logjacobian.nii.gz").is_file()  # native space
    report = (out / "sub-01.html").read_text()
    section = report[report.index("<h3>Counterfactual simulation</h3>"):report.index("<h3>Derivatives</h3>")]
    assert section.count("data:image/png;base64,") == 2
    for direction in ("inject", "remove"):
        meta = json.loads((anat / f"{stem}_desc-{direction}_logjacobian.json").read_text())
        before, after = meta["ProbabilitiesBefore"]["m"], meta["ProbabilitiesAfter"]["m"]
        assert f"<td>{before:.3f} → {after:.3f}</td>" in section
