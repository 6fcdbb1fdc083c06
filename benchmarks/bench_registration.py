"""Registration quality and run time of participant preprocessing on a BIDS dataset.

For every participant (or those given with --participants) and every registration type
(default: affine and nonlinear) this runs `init_participant_wf` at the chosen template
resolution, one participant at a time (Nipype Linear plugin, `--omp-nthreads` ITK
threads), and reports per participant:

* dice: Dice(template brain mask, subject brain mask registered to the template grid),
  the subject mask being T1w > 0 (holes filled), warped with linear interpolation and
  thresholded at 0.5 (the `RegistrationQC.BrainMaskDice` of the preproc T1w sidecar);
* dice_img: Dice(template brain mask, registered T1w > 1 % of its 99th percentile),
  i.e. the registered image binarised at a small threshold;
* wall_s / cpu_s: wall and CPU (user+system, all threads) time of the whole workflow.

It prints a table and, last, one JSON line with min/median/max per registration type.

    nice python benchmarks/bench_registration.py                      # all, ~1 h
    python benchmarks/bench_registration.py --participants 01 03 --types affine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grazbids.interfaces.masks import dice  # noqa: E402
from grazbids.templates import EMBEDDED_TEMPLATE  # noqa: E402
from grazbids.workflows.participant import init_participant_wf  # noqa: E402

DEFAULT_BIDS = REPO.parent / "shared" / "data" / "ds002748"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def find_t1w(bids_dir: Path, participants: list[str] | None) -> dict[str, list[Path]]:
    labels = participants or sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    found = {}
    for label in labels:
        label = label[4:] if label.startswith("sub-") else label
        files = sorted((bids_dir / f"sub-{label}").glob("**/anat/*_T1w.nii*"))
        if not files:
            raise SystemExit(f"no T1w for sub-{label} in {bids_dir}")
        found[label] = files
    return found


def run_one(label: str, t1w: Path, args, registration: str, root: Path) -> dict:
    output_dir, work_dir = root / registration / "out", root / registration / "work"
    wf = init_participant_wf(subject=label, t1w_files=[str(t1w)], bids_dir=str(args.bids_dir),
                             output_dir=str(output_dir), template=args.template,
                             resolution=args.resolution, registration=registration,
                             omp_nthreads=args.omp_nthreads, seed=args.seed)
    wf.base_dir = str(work_dir)
    cpu, start = _cpu_seconds(), time.perf_counter()
    wf.run(plugin="Linear")
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu

    anat = output_dir / f"sub-{label}" / "anat"
    stem = f"space-{args.template}_res-{args.resolution}"
    preproc = next(anat.glob(f"*_{stem}_desc-preproc_T1w.nii.gz"))
    mask = next(anat.glob(f"*_{stem}_desc-brain_mask.nii.gz"))
    meta = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
    image = nb.load(preproc).get_fdata()
    threshold = 0.01 * np.percentile(image[image > 0], 99)
    dice_img = dice(image > threshold, nb.load(mask).get_fdata() > 0)
    if not args.keep:
        shutil.rmtree(work_dir / wf.name, ignore_errors=True)
    return {"participant": label, "registration": registration,
            "dice": meta["RegistrationQC"]["BrainMaskDice"], "dice_img": round(dice_img, 4),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for registration in sorted({r["registration"] for r in rows}):
        sel = [r for r in rows if r["registration"] == registration]
        out[registration] = {"n": len(sel)}
        for key in ("dice", "dice_img", "wall_s", "cpu_s"):
            values = [r[key] for r in sel]
            out[registration][key] = {"min": min(values), "median": statistics.median(values),
                                      "max": max(values)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--participants", nargs="+", help="labels (default: all)")
    parser.add_argument("--types", nargs="+", default=["affine", "nonlinear"],
                        choices=["rigid", "affine", "nonlinear"])
    parser.add_argument("--template", default=EMBEDDED_TEMPLATE)
    parser.add_argument("--resolution", type=int, default=2)
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep work and output folders")
    parser.add_argument("--json-out", type=Path, help="also write all rows and the summary")
    args = parser.parse_args(argv)
    args.bids_dir = args.bids_dir.absolute()

    subjects = find_t1w(args.bids_dir, args.participants)
    root = (args.work_dir or Path(tempfile.mkdtemp(prefix="bench_registration_"))).absolute()
    print(f"# {len(subjects)} participants, {args.types}, {args.template} res-{args.resolution}, "
          f"{args.omp_nthreads} ITK threads, {os.cpu_count()} CPUs, work: {root}", flush=True)
    print(f"{'participant':<12}{'registration':<14}{'dice':>8}{'dice_img':>10}"
          f"{'wall_s':>9}{'cpu_s':>9}", flush=True)
    rows = []
    try:
        for label, files in subjects.items():
            for registration in args.types:
                row = run_one(label, files[0], args, registration, root)
                rows.append(row)
                print(f"sub-{label:<8}{registration:<14}{row['dice']:>8.4f}{row['dice_img']:>10.4f}"
                      f"{row['wall_s']:>9.1f}{row['cpu_s']:>9.1f}", flush=True)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
               "template": args.template, "resolution": args.resolution,
               "omp_nthreads": args.omp_nthreads, **summarize(rows)}
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
