"""Group-level training on its own, for several GPUs or nodes with torchrun.

The BIDS App's group level trains in one process. For data-parallel training across
GPUs/nodes, first run the participant level, then launch this with PyTorch's launcher:

    torchrun --nproc_per_node 4 -m grazbids.train /bids /out --target-column group

Every process loads the cohort and trains its share of each batch; gradients are
averaged by DistributedDataParallel; rank 0 writes the same outputs as the group level
(``/out/group/mode-<mode>/``). Batch size is per process (global batch = 2 x processes).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from .config import DEFAULT_CV_FOLDS, DEFAULT_EPOCHS, DEFAULT_RESOLUTION, DEFAULT_SEED, DEFAULT_TEMPLATE, DEVICES, MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grazbids-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="input BIDS dataset (for participants.tsv)")
    parser.add_argument("output_dir", type=Path, help="grazbids output folder with participant-level results")
    parser.add_argument("--target-column", required=True, help="participants.tsv column with the classes")
    parser.add_argument("--participant-label", nargs="+", default=None, help="default: every preprocessed participant")
    parser.add_argument("--mode", dest="modes", nargs="+", choices=MODES, default=["grazplus"])
    parser.add_argument("--cv-folds", type=int, default=DEFAULT_CV_FOLDS)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--random-seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("-w", "--work-dir", type=Path, default=None, help="checkpoints (default: <output_dir>_work/train)")
    return parser


def _init_distributed(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")


def main(argv: list[str] | None = None) -> int:
    from .group_training import GroupInputError, run_group_training

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    _init_distributed(args.device)
    participants = [p.removeprefix("sub-") for p in args.participant_label] if args.participant_label else sorted(
        p.name.removeprefix("sub-") for p in args.output_dir.glob("sub-*") if p.is_dir())
    try:
        run_group_training(
            bids_dir=args.bids_dir, output_dir=args.output_dir, participants=participants,
            target_column=args.target_column, modes=args.modes, cv_folds=args.cv_folds, epochs=args.epochs,
            seed=args.random_seed, device=args.device, template=args.template, resolution=args.resolution,
            work_dir=args.work_dir or Path(f"{args.output_dir}_work") / "train",
        )
    except GroupInputError as err:
        print(f"grazbids-train: error: {err}", file=sys.stderr)
        return 65
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
