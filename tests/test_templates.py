"""Offline templates: the embedded MNI152NLin2009aSym build and user TemplateFlow homes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from grazbids import templates
from grazbids.templates import (
    EMBEDDED_TEMPLATE,
    TemplateNotFoundError,
    ensure_embedded_template,
    get_template,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory):
    """One embedded build per module, in a temporary GRAZBIDS_TEMPLATE_DIR."""
    home = tmp_path_factory.mktemp("grazbids_templates")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAZBIDS_TEMPLATE_DIR", str(home))
        ensure_embedded_template()
        yield home


@pytest.fixture
def offline_env(embedded_home, monkeypatch):
    """Embedded home active; TEMPLATEFLOW_HOME restored after each test."""
    monkeypatch.setenv("GRAZBIDS_TEMPLATE_DIR", str(embedded_home))
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    return embedded_home


def _write_tiny_template(home: Path, name: str = "Tiny", res_label: str = "01",
                         empty: tuple = ()) -> Path:
    """A 6x6x6 template with TemplateFlow's zero-padded names; `empty`: placeholders."""
    folder = home / f"tpl-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "template_description.json").write_text(json.dumps({"Identifier": name}))
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    data = np.zeros((6, 6, 6), np.float32)
    data[1:5, 1:5, 1:5] = 1
    tails = {"T1w": data * 100, "desc-brain_mask": data, "label-GM_probseg": data * 0.5,
             "label-WM_probseg": data * 0.3, "label-CSF_probseg": data * 0.2}
    for tail, values in tails.items():
        path = folder / f"tpl-{name}_res-{res_label}_{tail}.nii.gz"
        if tail in empty:
            path.write_bytes(b"")
        else:
            nb.save(nb.Nifti1Image(values, affine), path)
    return folder


def test_embedded_files_have_templateflow_names_and_grids(offline_env):
    folder = offline_env / f"tpl-{EMBEDDED_TEMPLATE}"
    for res, shape, origin in ((1, (197, 233, 189), (-98, -134, -72)),
                               (2, (97, 115, 97), (-96, -132, -74))):
        tpl = get_template(EMBEDDED_TEMPLATE, res)
        assert tpl.shape == shape and tpl.zooms == (float(res),) * 3
        assert tpl.t1w == folder / f"tpl-{EMBEDDED_TEMPLATE}_res-{res}_T1w.nii.gz"
        assert tpl.brain_mask.name == f"tpl-{EMBEDDED_TEMPLATE}_res-{res}_desc-brain_mask.nii.gz"
        assert tpl.csf.name == f"tpl-{EMBEDDED_TEMPLATE}_res-{res}_label-CSF_probseg.nii.gz"
        mask_img = nb.load(tpl.brain_mask)
        assert np.allclose(mask_img.affine[:3, 3], origin)
        mask = mask_img.get_fdata()
        assert set(np.unique(mask)) == {0.0, 1.0}
        # ~1.89 l: the ICBM 2009a brain mask (brain + CSF)
        assert 1.8e6 < mask.sum() * res**3 < 2.0e6
        tissues = sum(nb.load(p).get_fdata() for p in tpl.probsegs.values())
        assert np.all(tissues <= 1.0 + 1e-3)
        assert np.mean(tissues[mask > 0]) > 0.97  # GM+WM+CSF fill the mask
    description = json.loads((folder / "template_description.json").read_text())
    assert description["res"]["2"]["shape"] == [97, 115, 97]
    assert (folder / "LICENSE").read_text().startswith("ICBM 2009a")


def test_stale_build_is_replaced_without_leftovers(offline_env, tmp_path, monkeypatch):
    home = tmp_path / "stale"
    monkeypatch.setenv("GRAZBIDS_TEMPLATE_DIR", str(home))
    ensure_embedded_template()
    desc = home / f"tpl-{EMBEDDED_TEMPLATE}" / "template_description.json"
    desc.write_text(json.dumps({"GrazbidsBuild": -1}))  # an older build
    ensure_embedded_template()
    assert json.loads(desc.read_text())["GrazbidsBuild"] == templates.EMBEDDED_BUILD
    assert sorted(p.name for p in home.iterdir()) == [
        "dataset_description.json", f"tpl-{EMBEDDED_TEMPLATE}"]


def test_user_template_from_templateflow_home(offline_env, tmp_path, monkeypatch):
    user_home = tmp_path / "tf"
    _write_tiny_template(user_home)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(user_home))
    tpl = get_template("Tiny", 1)
    assert tpl.t1w == user_home / "tpl-Tiny" / "tpl-Tiny_res-01_T1w.nii.gz"
    assert tpl.wm.name == "tpl-Tiny_res-01_label-WM_probseg.nii.gz"
    assert tpl.shape == (6, 6, 6) and tpl.zooms == (3.0, 3.0, 3.0)
    # the user's home lacks the embedded template: it still comes from the embedded one
    embedded = get_template(EMBEDDED_TEMPLATE, 2)
    assert embedded.t1w.parent.parent == offline_env


def test_missing_template_names_files_and_variable(offline_env, tmp_path, monkeypatch):
    with pytest.raises(TemplateNotFoundError) as err:
        get_template("MNI152NLin2009cAsym", 2)
    message = str(err.value)
    assert "TEMPLATEFLOW_HOME" in message and "unset" in message
    assert "tpl-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz" in message
    user_home = tmp_path / "tf"
    _write_tiny_template(user_home)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(user_home))
    with pytest.raises(TemplateNotFoundError, match=r"no t1w file .* res-2"):
        get_template("Tiny", 2)  # only res-01 is there
    with pytest.raises(TemplateNotFoundError, match="resolutions"):
        get_template(EMBEDDED_TEMPLATE, 3)


def test_zero_byte_placeholder_is_an_error_not_a_download(offline_env, tmp_path, monkeypatch):
    user_home = tmp_path / "tf"
    _write_tiny_template(user_home, empty=("label-GM_probseg",))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(user_home))

    def no_network(*args, **kwargs):
        raise AssertionError("templateflow tried to download")

    import templateflow.client

    monkeypatch.setattr(templateflow.client, "_s3_get", no_network)
    with pytest.raises(TemplateNotFoundError, match="zero-byte TemplateFlow placeholder") as err:
        get_template("Tiny", 1)
    assert "tpl-Tiny_res-01_label-GM_probseg.nii.gz" in str(err.value)


def _run_offline(code: str, env: dict) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (templateflow reads its home at import) with
    every socket connection refused."""
    guard = textwrap.dedent("""\
        import socket
        def _refuse(*args, **kwargs):
            raise RuntimeError("network access attempted")
        socket.socket.connect = _refuse
        socket.create_connection = _refuse
        socket.getaddrinfo = _refuse
    """)
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPLATEFLOW")}
    env.update(extra)
    return env


def test_templateflow_api_serves_embedded_files_offline(embedded_home):
    result = _run_offline("""
        import os
        from grazbids.templates import get_template
        tpl = get_template("MNI152NLin2009aSym", 2)
        from templateflow import api
        got = api.get("MNI152NLin2009aSym", resolution=2, suffix="T1w", desc=None)
        assert str(got) == str(tpl.t1w), (got, tpl.t1w)
        mask = api.get("MNI152NLin2009aSym", resolution=1, desc="brain", suffix="mask")
        assert mask.stat().st_size > 0
        print(os.environ["TEMPLATEFLOW_HOME"])
    """, _clean_env(GRAZBIDS_TEMPLATE_DIR=str(embedded_home)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(embedded_home)
    assert "Downloading" not in result.stderr


def test_empty_user_home_gets_no_skeleton(embedded_home, tmp_path):
    empty = tmp_path / "empty_tf_home"
    empty.mkdir()
    result = _run_offline("""
        import os
        from grazbids.templates import get_template, TemplateNotFoundError
        get_template("MNI152NLin2009aSym", 2)
        try:
            get_template("MNI152NLin2009cAsym", 1)
        except TemplateNotFoundError as err:
            print("missing:", err)
        assert os.environ["TEMPLATEFLOW_HOME"] == os.environ["EXPECTED_HOME"]
    """, _clean_env(GRAZBIDS_TEMPLATE_DIR=str(embedded_home), TEMPLATEFLOW_HOME=str(empty),
                    EXPECTED_HOME=str(empty)))
    assert result.returncode == 0, result.stderr
    assert "missing:" in result.stdout and str(empty) in result.stdout
    assert list(empty.iterdir()) == []  # templateflow did not unpack its placeholders
