"""Training loop: Adam, gradient accumulation, class weights, per-epoch log, checkpoints.

Epoch selection rule (documented in docs/engine.md): the epoch with the best
validation balanced accuracy; ties go to the higher validation relevance fraction
inside the mask, then to the later epoch. Without a validation set: the last epoch.

Checkpoints are single safetensors files (weights, Adam state and a JSON header), so
resuming never unpickles anything and an interrupted run continues bit-identically:
the shuffling order of each epoch depends only on (seed, epoch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..utils.atomic import atomic_path, write_text
from .cohort_cache import CohortCache, iterate_batches
from ..utils.process_logging import ensure_process_logging
from .data import balanced_accuracy, class_weights
from .device import resolve_device
from .losses import check_mode, check_mode_for_architecture, compute_loss
from .architectures import build_model
from .model import Architecture, GrazPlusNet
from .modes import model_input

LOG = logging.getLogger("grazbids.engine")

HISTORY_COLUMNS = (
    "epoch",
    "train_loss", "train_ce", "train_relevance_inside", "train_balanced_accuracy",
    "val_loss", "val_ce", "val_relevance_inside", "val_balanced_accuracy",
)


@dataclass
class TrainSettings:
    mode: str = "grazplus"
    epochs: int = 60
    batch_size: int = 2
    accumulation_steps: int = 4  # effective batch = batch_size * accumulation_steps
    learning_rate: float = 1e-4
    warmup_epochs: int = 0  # linear warm-up: epoch e <= W trains at learning_rate * e / W
    relevance_weight: float = 1.0
    guidance_loss: str = "additive"  # relevance term: Graz+ "additive" or Šefčík's "ratio" (CE / M^p)
    guidance_power: float = 1.0  # p of the ratio loss
    outside_penalty: str = "none"  # grazbids.engine.guidance: "invariance", "gradient" or "signed" (outside the brain)
    outside_penalty_weight: float = 1.0
    seed: int = 42
    device: str = "auto"
    compile: bool = False  # torch.compile the loss (faster; falls back to eager on failure)
    progress: bool = True
    data_workers: int = 2  # DataLoader processes reading ahead from a CohortCache (0: in this process)

    def fingerprint(self, train_index: np.ndarray) -> str:
        """What must match for a checkpoint to be resumable (not epochs, progress, device,
        compile or data_workers: none of them changes the result)."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("epochs", "progress", "device", "compile", "data_workers")}
        if keys["outside_penalty"] == "none":  # checkpoints written before the option still resume
            del keys["outside_penalty"], keys["outside_penalty_weight"]
        if keys["warmup_epochs"] == 0:  # likewise
            del keys["warmup_epochs"]
        keys["train_index"] = np.asarray(train_index).tolist()
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def warmup_learning_rate(learning_rate: float, warmup_epochs: int, epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based) under a linear warm-up over ``warmup_epochs``."""
    if warmup_epochs <= 0:
        return learning_rate
    return learning_rate * min(1.0, epoch / warmup_epochs)


@dataclass
class TrainingData:
    """Images (N, 1, D, H, W) and masks float32 tensors, labels (N,) int64.

    ``masks`` has the brain mask in channel 0 and, optionally, a guidance mask (lesion,
    tissue, ...) in channel 1 that the relevance term uses instead (see losses.py).
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    n_classes: int

    def __post_init__(self):
        same_grid = self.masks.dim() == 5 and self.masks.shape[0] == self.images.shape[0] \
            and self.masks.shape[2:] == self.images.shape[2:] and self.masks.shape[1] in (1, 2)
        if not same_grid:
            raise ValueError(f"masks {tuple(self.masks.shape)} must be (N, 1 or 2, D, H, W) like images "
                             f"{tuple(self.images.shape)}")
        if self.images.dim() != 5 or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, D, H, W), got {tuple(self.images.shape)}")
        if (self.images < 0).any():
            raise ValueError("z+ LRP needs non-negative inputs: normalise images first")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FitResult:
    model: GrazPlusNet
    history: list[dict]
    selected_epoch: int
    val_probabilities: np.ndarray | None  # (n_val, n_classes) at the selected epoch
    val_relevance_inside: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    collapsed_epoch: int | None = None  # epoch after which the output stopped depending on the input


def output_collapsed(probabilities: np.ndarray, tolerance: float = 1e-6) -> bool:
    """True when different inputs got the same class probabilities: the network's output no
    longer depends on its input (typically every ReLU of a layer died after a too-large step,
    which also makes every heat map zero). Such a network cannot recover: no gradient
    reaches the layers before the dead one."""
    probabilities = np.asarray(probabilities)
    return len(probabilities) > 1 and float(np.ptp(probabilities, axis=0).max()) < tolerance


def _batches(index: np.ndarray, size: int):
    for start in range(0, len(index), size):
        yield index[start:start + size]


def _epoch_order(train_index: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return train_index[torch.randperm(len(train_index), generator=generator).numpy()]


def _is_better(candidate: tuple[float, float], best: tuple[float, float] | None) -> bool:
    # (balanced accuracy, relevance fraction); ">=" gives ties to the later epoch
    if best is None:
        return True
    fix = [(-1.0 if math.isnan(v) else v) for v in (*candidate, *best)]
    return (fix[0], fix[1]) >= (fix[2], fix[3])


class Trainer:
    """Trains one model on ``data[train_index]``, validating on ``data[val_index]``."""

    def __init__(self, arch: Architecture, settings: TrainSettings, workdir: str | Path | None = None, name: str = "train"):
        check_mode(settings.mode)
        check_mode_for_architecture(settings.mode, arch.name, settings.outside_penalty)
        self.arch = arch
        self.settings = settings
        self.workdir = Path(workdir) if workdir else None
        self.name = name
        self.device = resolve_device(settings.device)

    # ---- checkpoints -------------------------------------------------------------
    # The latest checkpoint and the one before it are kept, and each selected-epoch file
    # records its epoch: a damaged file (full disk, a copy cut short) costs one epoch, and a
    # checkpoint is only resumed together with the selected weights it refers to.
    def _checkpoint_path(self) -> Path | None:
        return self.workdir / "checkpoint.safetensors" if self.workdir else None

    def _save_checkpoint(self, model, optimiser, header: dict) -> None:
        save_checkpoint(self._checkpoint_path(), model, optimiser, header)

    def _load_checkpoint(self, model, optimiser, fingerprint: str) -> dict | None:
        """``load_checkpoint``, accepting a checkpoint only with the selected-epoch weights
        it refers to."""
        found = {}

        def has_selected(header: dict, candidate: Path) -> bool:
            found["selected"] = self._find_selected(header.get("best"))
            if found["selected"] is False:
                LOG.warning("%s: the selected-epoch weights that checkpoint %s refers to (epoch %s) are missing or "
                            "damaged; not resuming from it", self.name, candidate, header["best"]["epoch"])
                return False
            return True

        header = load_checkpoint(self._checkpoint_path(), model, optimiser, fingerprint, self.name, has_selected,
                                 total_epochs=self.settings.epochs)
        if header is not None:
            self._selected = found["selected"]
        return header

    def _find_selected(self, best: dict | None):
        """The selected-epoch tensors a checkpoint refers to; None without a validation set,
        False when no readable file holds that epoch."""
        if best is None:
            return None
        path = self.workdir / "selected.safetensors"
        for candidate in (path, _previous(path)):
            if not candidate.exists():
                continue
            try:
                metadata, tensors = _read_safetensors(candidate)
            except CheckpointError as err:
                _discard(candidate, f"{self.name}: selected-epoch weights {err}")
                continue
            # files written before epochs were recorded: only the current one, trusted as before
            epoch = metadata.get("epoch")
            if (epoch is None and candidate == path) or epoch == str(best["epoch"]):
                return tensors
        return False

    # ---- one pass ----------------------------------------------------------------
    def _loss_function(self, model):
        s = self.settings

        def loss(x, mask, y, w):
            out = compute_loss(model, x, mask, y, w, s.mode, s.relevance_weight,
                               guidance_loss=s.guidance_loss, guidance_power=s.guidance_power,
                               outside_penalty=s.outside_penalty, outside_penalty_weight=s.outside_penalty_weight)
            return out.loss, out.logits, out.ce, out.relevance_inside, out.relevance_total

        if not s.compile:
            return loss
        compiled = torch.compile(loss)

        def guarded(*args):
            nonlocal compiled
            if compiled is not None:
                try:
                    return compiled(*args)
                except Exception as err:  # no compiler in the image, unsupported op, ...
                    LOG.warning("torch.compile failed (%s); continuing without it", str(err).splitlines()[0][:200])
                    compiled = None
            return loss(*args)

        return guarded

    def _run_epoch(self, model, runner, optimiser, data, index, weights, train: bool, desc: str):
        """One pass over ``index``. Under torch.distributed each process takes its slice of
        every global batch (batch_size per process) and DDP averages the gradients."""
        s = self.settings
        rank, world = distributed_rank_and_size() if train else (0, 1)
        model.train(train)
        stats = {"loss": 0.0, "ce": 0.0, "fraction": [], "pred": [], "true": [], "prob": [], "inside": []}
        global_batches = list(_batches(index, s.batch_size * world))
        my_batches = [b[rank * s.batch_size:(rank + 1) * s.batch_size] for b in global_batches]
        # a CohortCache streams from disk through DataLoader workers; TrainingData is indexed
        reads = iterate_batches(data, my_batches, s.data_workers, pin_memory=self.device.type == "cuda")
        bar = tqdm(global_batches, desc=desc, leave=False, disable=not s.progress or rank != 0, unit="batch")
        for step, (global_batch, batch, (x, m, y)) in enumerate(zip(bar, my_batches, reads)):
            x = x.to(self.device, non_blocking=True)
            m = m.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            w = weights[y]
            group_start = step - step % s.accumulation_steps
            group_size = min(s.accumulation_steps, len(global_batches) - group_start)
            last_of_group = step - group_start == group_size - 1
            sync = contextlib.nullcontext() if (last_of_group or world == 1 or not train) else runner.no_sync()
            with torch.set_grad_enabled(train), sync:
                loss, logits, ce, inside, total = runner(x, m, y, w)
                if train:
                    # mean over the global batch (DDP averages over processes), then over the group
                    share = len(batch) * world / len(global_batch)
                    (loss * share / group_size).backward()
            if train and last_of_group:
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                if hasattr(model, "project_biases_"):  # the Graz+ network's bias <= 0 constraint
                    model.project_biases_()
            stats["loss"] += float(loss.detach()) * len(batch)
            stats["ce"] += float(ce.sum())
            inside_d, total_d = inside.detach(), total.detach()
            stats["fraction"] += (inside_d / total_d.clamp_min(1e-12)).cpu().tolist()
            stats["inside"] += inside_d.cpu().tolist()
            probs = torch.softmax(logits.detach(), dim=1).cpu()
            stats["prob"].append(probs.numpy())
            stats["pred"] += probs.argmax(1).tolist()
            stats["true"] += y.cpu().tolist()
        if world > 1:
            stats = _gather_stats(stats, world)
        n = max(len(index), 1)
        return {
            "loss": stats["loss"] / n,
            "ce": stats["ce"] / n,
            "relevance_inside": float(np.mean(stats["fraction"])) if stats["fraction"] else float("nan"),
            "balanced_accuracy": balanced_accuracy(np.array(stats["true"]), np.array(stats["pred"]), data.n_classes),
            "probabilities": np.concatenate(stats["prob"]) if stats["prob"] else np.zeros((0, data.n_classes)),
            "inside": np.array(stats["inside"]),
        }

    # ---- public ------------------------------------------------------------------
    def fit(self, data: TrainingData | CohortCache, train_index, val_index=None) -> FitResult:
        """``data``: in memory (``TrainingData``) or streamed from disk (``CohortCache``);
        both give bit-identical results."""
        s = self.settings
        ensure_process_logging()  # in a Nipype worker: progress and resume messages reach the user
        train_index = np.asarray(train_index)
        val_index = np.asarray(val_index) if val_index is not None and len(val_index) else None
        self._selected = None
        torch.manual_seed(s.seed)
        model = build_model(self.arch).to(self.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
        weights = torch.as_tensor(class_weights(data.labels[train_index].numpy(), data.n_classes), device=self.device)
        runner = _LossModule(self._loss_function(model), model)
        rank, world = distributed_rank_and_size()
        if world > 1:
            # PyTorch's own data parallelism (launch with torchrun): gradients are averaged
            # across processes; every process keeps identical weights.
            runner = torch.nn.parallel.DistributedDataParallel(runner)
        # the architecture too (a checkpoint of another network must not be resumed);
        # the Graz+ network keeps the fingerprints of checkpoints written before this
        fingerprint = s.fingerprint(train_index) + ("" if self.arch.name == "grazplus" else f"-{self.arch.name}")

        header = self._load_checkpoint(model, optimiser, fingerprint)
        history = header["history"] if header else []
        best = header["best"] if header else None  # {"epoch", "score": [ba, rel]}
        start = header["epoch"] + 1 if header else 1
        collapsed = None
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)

        for epoch in range(start, s.epochs + 1):
            desc = f"{self.name} epoch {epoch}/{s.epochs}"
            for group in optimiser.param_groups:  # a function of the epoch alone: resumes exactly
                group["lr"] = warmup_learning_rate(s.learning_rate, s.warmup_epochs, epoch)
            train = self._run_epoch(model, runner, optimiser, data, _epoch_order(train_index, s.seed, epoch), weights, True, desc)
            row = {"epoch": epoch, **{f"train_{k}": train[k] for k in ("loss", "ce", "relevance_inside", "balanced_accuracy")}}
            if val_index is not None:
                val = self._run_epoch(model, runner.module if world > 1 else runner, optimiser, data, val_index, weights, False, desc + " (val)")
                row.update({f"val_{k}": val[k] for k in ("loss", "ce", "relevance_inside", "balanced_accuracy")})
                score = (val["balanced_accuracy"], val["relevance_inside"])
                if _is_better(score, tuple(best["score"]) if best else None):
                    best = {"epoch": epoch, "score": list(score)}
                    self._save_selected(model, {**val, "epoch": epoch})
            history.append(row)
            LOG.info("%s epoch %d/%d: %s", self.name, epoch, s.epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if self.workdir and rank == 0:
                self._save_checkpoint(model, optimiser, {"epoch": epoch, "history": history, "best": best, "fingerprint": fingerprint})
                write_history(self.workdir / "history.tsv", history)
            if world > 1:
                torch.distributed.barrier()
            if self._collapsed(model, data, train_index, val["probabilities"] if val_index is not None else None):
                collapsed = epoch
                LOG.warning("%s: after epoch %d the network gives every input the same prediction (its ReLUs died, "
                            "its heat maps are zero); stopping this training. Use a lower --learning-rate (now %g) "
                            "or another --random-seed.", self.name, epoch, s.learning_rate)
                break

        selected, val_probs, val_inside = s.epochs, None, None
        if val_index is not None and best is not None:
            selected = best["epoch"]
            # kept in memory unless this is a resumed run that selected an earlier epoch
            tensors = self._selected
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            val_probs = tensors["val.probabilities"].numpy()
            val_inside = tensors["val.inside"].numpy()
        model.eval()
        return FitResult(model.cpu(), history, selected, val_probs, val_inside, collapsed_epoch=collapsed)

    def _collapsed(self, model, data: TrainingData, train_index: np.ndarray, val_probabilities=None,
                   n: int = 4) -> bool:
        """Checks the current weights: on this epoch's validation outputs when there are
        some (free), else on a few training inputs (one forward pass each)."""
        if val_probabilities is not None and len(val_probabilities) > 1:
            return output_collapsed(val_probabilities)
        was_training = model.training
        model.eval()
        index = train_index[:n]
        x = model_input(data.images[index], data.masks[index], self.settings.mode)
        with torch.inference_mode():
            logits = model(x.to(self.device))
        model.train(was_training)
        return output_collapsed(torch.softmax(logits.float(), dim=1).cpu().numpy())

    def _save_selected(self, model, val: dict) -> None:
        tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        tensors["val.probabilities"] = torch.as_tensor(val["probabilities"], dtype=torch.float32)
        tensors["val.inside"] = torch.as_tensor(val["inside"], dtype=torch.float32)
        self._selected = tensors
        if self.workdir and distributed_rank_and_size()[0] == 0:
            _write_keeping_previous(self.workdir / "selected.safetensors", tensors, {"epoch": str(val["epoch"])})


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read completely."""


def _previous(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", ".prev.safetensors"))


def _write_keeping_previous(path: Path, tensors: dict, metadata: dict) -> None:
    """Write ``path`` atomically; the file it replaces becomes ``<name>.prev.safetensors``."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if path.exists():
            path.replace(_previous(path))


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """Metadata and tensors of a complete file; CheckpointError otherwise (the header is
    checked first, so a damaged file never reaches the allocator)."""
    from safetensors import SafetensorError, safe_open

    from ..utils.safetensors_header import WeightsFileError, read_header

    try:
        read_header(path)
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        return metadata, load_file(str(path))
    except (WeightsFileError, SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})") from None


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    metadata, tensors = _read_safetensors(path)
    try:
        header = json.loads(metadata["header"])
        int(header["epoch"]), header["param_groups"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has no valid header ({err})") from None
    return header, tensors


def _discard(path: Path, message: str) -> None:
    """Move a damaged file aside (kept for inspection, never read again) and say so."""
    broken = path.with_name(path.name + ".broken")
    LOG.warning("%s; moved aside to %s", message, broken.name)
    try:
        path.replace(broken)
    except OSError as err:
        LOG.warning("cannot move %s aside: %s", path, err)


def save_checkpoint(path: Path, model, optimiser, header: dict) -> None:
    """Weights, Adam state and a JSON header in one safetensors file, written atomically
    (the previous one kept): the Trainer's format, for other training loops (the
    counterfactual simulator)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimiser.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    header = {**header, "param_groups": opt_state["param_groups"]}
    _write_keeping_previous(path, tensors, {"header": json.dumps(header)})


def _restore(model, optimiser, header: dict, tensors: dict) -> None:
    """Model weights and Adam state from a checkpoint's tensors (``model.*``, ``optim.<i>.*``)."""
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, param = key.split(".", 2)
            state.setdefault(int(index), {})[param] = value
    optimiser.load_state_dict({"state": state, "param_groups": header["param_groups"]})


def load_checkpoint(path: Path | None, model, optimiser, fingerprint: str, name: str = "train",
                    accept=None, total_epochs: int | None = None) -> dict | None:
    """Restore model and optimiser from ``path`` (or its previous version when it is damaged
    or ``accept(header, candidate)`` refuses it) when the fingerprint matches; the header,
    else None."""
    if path is None:
        return None
    for candidate in (path, _previous(path)):
        if not candidate.exists():
            continue
        try:
            header, tensors = _read_checkpoint(candidate)
        except CheckpointError as err:
            _discard(candidate, f"{name}: checkpoint {err}")
            continue
        if header.get("fingerprint") != fingerprint:
            LOG.warning("%s: checkpoint %s was made with other settings; starting afresh", name, candidate)
            return None
        if accept is not None and not accept(header, candidate):
            continue
        _restore(model, optimiser, header, tensors)
        of_total = f" of {total_epochs}" if total_epochs else ""
        LOG.info("%s: resuming after epoch %d%s from %s", name, header["epoch"], of_total, candidate)
        return header
    if path.exists() or _previous(path).exists():
        LOG.warning("%s: no usable checkpoint in %s; training starts from epoch 1", name, path.parent)
    return None


class _LossModule(torch.nn.Module):
    """The loss as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, loss_fn, model):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, x, mask, y, w):
        return self._loss_fn(x, mask, y, w)


def distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_stats(stats: dict, world: int) -> dict:
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, stats)
    merged = {k: (0.0 if isinstance(v, float) else []) for k, v in stats.items()}
    for part in gathered:
        for k, v in part.items():
            merged[k] = merged[k] + v
    return merged


def write_history(path: Path, history: list[dict], columns: tuple[str, ...] = HISTORY_COLUMNS) -> None:
    columns = [c for c in columns if any(c in row for row in history)]
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(_fmt(row.get(c, float("nan"))) for c in columns))
    write_text(path, "\n".join(lines) + "\n")


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"
