"""``grazbids-train``: the group level under torchrun, for several GPUs or nodes.

The same program as ``grazbids BIDS OUT group``: the same parser, options, settings,
outputs, exit codes and run summary. Run the participant level first, then e.g.

    torchrun --nproc_per_node 4 -m grazbids.group.torchrun /bids /out group --target-column dx [options]

(``group`` may be left out). Every process loads the cohort and trains its share of each
batch; DistributedDataParallel averages the gradients. Rank 0 runs the whole group level
(checks, Nipype workflow in-process, outputs, report, summary); the other ranks run the
same checks and then only the training. Batch size is per process (global batch =
--batch-size x processes).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

LOGGER = logging.getLogger("grazbids")


def group_argv(argv: list[str]) -> list[str]:
    """``BIDS OUT [group] options`` -> ``BIDS OUT group options``."""
    positional = [i for i, a in enumerate(argv[:3]) if not a.startswith("-")]
    if len(positional) >= 2 and (len(argv) < 3 or argv[2] != "group") and positional[:2] == [0, 1]:
        return [*argv[:2], "group", *argv[2:]]
    return list(argv)


def _init_distributed(device: str) -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")


def _train_only(argv: list[str]) -> int:
    """Ranks > 0: the same checks as rank 0, then the training (rank 0 writes everything)."""
    from ..cli.parser import parse_args
    from ..cli.preflight import run_preflight
    from ..cli.run import setup_logging
    from ..cli.summary import RunReport
    from ..config import GroupSettings
    from ..workflows.base import group_participants
    from .training import run_group_training

    config = parse_args(argv)
    setup_logging(config.verbosity)
    config, _ = run_preflight(config, RunReport("group", command=["grazbids-train", *argv]))
    settings = GroupSettings.from_run_config(config, group_participants(config))
    run_group_training(settings, Path(config.work_dir) / "group_training")
    return 0


def _check_preprocessed(argv: list[str]) -> None:
    """Preprocessing inside a distributed run would run on rank 0 alone: refuse it."""
    from ..cli.parser import parse_args
    from ..cli.preflight import run_preflight
    from ..cli.summary import RunReport
    from ..exitcodes import ExitCode, GrazbidsError
    from ..workflows.base import participants_to_preprocess

    config, _ = run_preflight(parse_args(argv), RunReport("group", command=["grazbids-train", *argv]))
    missing = participants_to_preprocess(config)
    if missing:
        raise GrazbidsError(ExitCode.BAD_DATA, f"{len(missing)} participant(s) have no preprocessed T1w in "
                            f"{config.output_dir} (e.g. sub-{missing[0]}): run the participant level first")


def main(argv: list[str] | None = None) -> int:
    from ..cli import run as cli_run
    from ..exitcodes import GrazbidsError

    argv = group_argv(sys.argv[1:] if argv is None else list(argv))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if distributed:
            from ..cli.parser import parse_args

            _init_distributed(parse_args(argv).device)
            _check_preprocessed(argv)
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            return _train_only(argv)
        # rank 0 (or a single process): the group level itself, training in this process
        # (the Linear plugin) so that it joins the process group
        return cli_run.main(argv, adjust=(lambda c: replace(c, plugin="Linear", plugin_args={}))
                            if distributed else None)
    except GrazbidsError as err:
        if not logging.getLogger().handlers:
            cli_run.setup_logging(0)
        LOGGER.error("%s", err.message)
        return int(err.code)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 64
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
