"""Render reports from an existing grazbids derivatives folder (e.g. outputs written
before reports existed): ``python -m grazbids.reports OUTPUT_DIR [--participant-label 01 ...]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import discover_t1w_outputs, render_t1w_section, write_group_report, write_participant_report
from .group import mode_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grazbids.reports", description=__doc__)
    parser.add_argument("output_dir", type=Path, help="grazbids derivatives folder")
    parser.add_argument("--participant-label", nargs="+", default=None,
                        help="participants to report (default: every sub-* folder)")
    parser.add_argument("--no-group", action="store_true", help="do not render group/report.html")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.output_dir.is_dir():
        parser.error(f"{args.output_dir} is not a folder")
    labels = ([label.removeprefix("sub-") for label in args.participant_label] if args.participant_label
              else sorted(p.name.removeprefix("sub-") for p in args.output_dir.glob("sub-*") if p.is_dir()))
    for label in labels:
        outputs = discover_t1w_outputs(args.output_dir, label)
        if not outputs:
            logging.warning("sub-%s: no template-space T1w in %s; no report", label, args.output_dir)
            continue
        write_participant_report(label, [render_t1w_section(o, args.output_dir) for o in outputs], args.output_dir)
    if not args.no_group and mode_dirs(args.output_dir):
        write_group_report(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
