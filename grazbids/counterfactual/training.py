"""Training the simulator against a frozen classifier, with the engine's machinery:
safetensors checkpoints with a settings fingerprint (an interrupted run resumes after
the last finished epoch, bit-identically: the order of each epoch depends only on
(seed, epoch)), tqdm progress, a per-epoch history TSV and a dead-network check.

Only correctly classified images are used (Liu et al.): every control is trained with
c = +1 (inject), every patient with c = -1 (remove); the cycle term sends the result
back with -c. The classifier's weights never change (requires_grad off, eval mode);
gradients flow through it into the warped image only.

With a centred field (SimulatorArchitecture.centre_field, the command line's default) or
``displacement_weight`` > 0, two phases: the last epochs continue the simulator with its
field centred in the brain (and/or a penalty on the displacement itself), which removes
a shift of the whole brain that the first phase adds (docs/counterfactual.md, "Session 8"
and "Session 9").
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.device import resolve_device
from ..engine.trainer import (
    _batches, _epoch_order, load_checkpoint, output_collapsed, save_checkpoint, write_history,
)
from .losses import SMOOTHNESS_PENALTIES, cycle_loss, disease_log_odds, displacement, logit_shift_hinge, smoothness
from .network import ConditionalUNet, SimulatorArchitecture
from .warp import folded_fraction, warp

LOG = logging.getLogger("grazbids.counterfactual")
HISTORY_COLUMNS = ("epoch", "loss", "hinge", "smoothness", "cycle", "displacement", "flip_fraction",
                   "mean_displacement_voxels", "folded_fraction")


# The squared strains of a decision-changing warp are ~1e-5 to 1e-4 per voxel: the l2 weight
# that recovered the true atrophy on the 4 mm benchmark lies on a plateau from 3e4 to 3e5.
DEFAULT_SMOOTHNESS_WEIGHT = {"l1": 1.0, "l2": 1e5}


@dataclass
class SimulatorSettings:
    epochs: int = 30
    batch_size: int = 2
    # with l2 smoothness 3e-4 hardly moved the field in 2 epochs and 1e-3 trained stably; with l1, 1e-3 blew
    # up at epoch 5 (use 3e-4 there); the 4 mm atrophy benchmark, docs/counterfactual.md
    learning_rate: float = 1e-3
    # required shift of the disease log-odds: a decision flips only when it exceeds the classifier's
    # |log-odds| (trained CNNs: often 5-10). On the 4 mm benchmark (log-odds +-6 to 8) 12 flipped the
    # decisions and 2 flipped none (docs/counterfactual.md, "Session 9")
    margin: float = 12.0
    smoothness_penalty: str = "l2"  # "l1" is the paper's; it found adversarial warps (docs/counterfactual.md)
    smoothness_weight: float | None = None  # None: DEFAULT_SMOOTHNESS_WEIGHT of the penalty
    cycle_weight: float = 1.0
    # > 0: the second phase adds this weight x the mean squared displacement (voxels^2). Weight 10 in a second
    # phase: r 0.36 -> 0.66 and 0.40 -> 0.54 on two classifiers, but on a third the warp stopped flipping
    # decisions (r 0.37 -> 0.00), so it is not the default (docs/counterfactual.md, "Session 8").
    displacement_weight: float = 0.0
    # The last epochs run as a second phase, continuing the first phase's simulator with a fresh optimiser,
    # when the simulator centres its field (SimulatorArchitecture.centre_field: from the identity a centred
    # field did not learn; the first phase's shift of the whole brain is what gets the U-Net moving) or
    # displacement_weight > 0. None: a quarter of the epochs.
    second_phase_epochs: int | None = None
    seed: int = 42
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.smoothness_penalty not in SMOOTHNESS_PENALTIES:
            raise ValueError(f"smoothness penalty {self.smoothness_penalty!r}: one of {SMOOTHNESS_PENALTIES}")
        if self.smoothness_weight is None:
            self.smoothness_weight = DEFAULT_SMOOTHNESS_WEIGHT[self.smoothness_penalty]
        if self.displacement_weight < 0:
            raise ValueError(f"displacement weight must be >= 0, got {self.displacement_weight}")
        if self.second_phase_epochs is not None and not 0 <= self.second_phase_epochs < self.epochs:
            raise ValueError(f"second-phase epochs must be from 0 to epochs - 1 ({self.epochs - 1}), "
                             f"got {self.second_phase_epochs}")

    def phases(self, centred: bool = False) -> list["SimulatorSettings"]:
        """The settings of each training phase: one, unless the field is ``centred`` or the
        displacement weight is > 0; then a first phase without the displacement term and a
        second one with it (and the centring) for the last epochs."""
        second = self.epochs // 4 if self.second_phase_epochs is None else self.second_phase_epochs
        if not (centred or self.displacement_weight) or second == 0:
            return [replace(self, displacement_weight=0.0, second_phase_epochs=0)]
        return [replace(self, epochs=self.epochs - second, displacement_weight=0.0, second_phase_epochs=0),
                replace(self, epochs=second, second_phase_epochs=0)]

    def fingerprint(self, arch: SimulatorArchitecture, classifier_sha256: str, index: np.ndarray,
                    initial_state: dict | None = None) -> str:
        keys = {k: v for k, v in asdict(self).items() if k not in ("epochs", "second_phase_epochs", "progress", "device")}
        if keys["smoothness_penalty"] == "l1":  # checkpoints from before the option stay resumable
            del keys["smoothness_penalty"]
        if keys["displacement_weight"] == 0.0:  # likewise from before that option
            del keys["displacement_weight"]
        keys.update(arch=arch.to_dict(), classifier=classifier_sha256, index=np.asarray(index).tolist())
        if initial_state is not None:
            digest = hashlib.sha256()
            for name in sorted(initial_state):
                digest.update(name.encode() + initial_state[name].detach().cpu().contiguous().numpy().tobytes())
            keys["initial_state"] = digest.hexdigest()
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def simulator_objective(s: SimulatorSettings, x, mask, c, before, after, u, back) -> dict[str, torch.Tensor]:
    """The training loss and its terms (per sample) of the warp ``u`` of ``x`` in direction ``c``
    and its way back ``back``; ``before``/``after``: the disease log-odds of x and of its warp."""
    hinge = logit_shift_hinge(before, after, c, s.margin)
    smooth = smoothness(u, s.smoothness_penalty) + smoothness(back, s.smoothness_penalty)
    cycle = cycle_loss(x, warp(warp(x, u), back), mask)
    shift = displacement(u) + displacement(back)
    loss = hinge + s.smoothness_weight * smooth + s.cycle_weight * cycle + s.displacement_weight * shift
    return {"loss": loss, "hinge": hinge, "smoothness": smooth, "cycle": cycle, "displacement": shift}


@dataclass
class SimulatorFit:
    simulator: ConditionalUNet
    history: list[dict]
    used_index: np.ndarray  # the correctly classified images trained on
    collapsed_epoch: int | None = None
    extra: dict = field(default_factory=dict)


def freeze(classifier: torch.nn.Module) -> torch.nn.Module:
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier


def directions(labels: torch.Tensor, positive: int) -> torch.Tensor:
    """+1 (inject) for images not of the disease class, -1 (remove) for the disease class."""
    return torch.where(labels == positive, -1.0, 1.0)


@torch.no_grad()
def correctly_classified(classifier, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 2) -> np.ndarray:
    keep = []
    for batch in _batches(np.arange(len(labels)), batch_size):
        logits = classifier(images[batch].to(device))
        keep += (logits.argmax(1).cpu() == labels[batch]).tolist()
    return np.flatnonzero(keep)


class SimulatorTrainer:
    def __init__(self, arch: SimulatorArchitecture, settings: SimulatorSettings, workdir: str | Path | None = None,
                 name: str = "counterfactual"):
        self.arch, self.settings, self.name = arch, settings, name
        self.workdir = Path(workdir) if workdir else None
        self.device = resolve_device(settings.device)

    def step_losses(self, simulator, classifier, x, mask, c, positive: int, settings: SimulatorSettings | None = None):
        """Loss terms of one batch (per sample) and the logits before/after the warp (under
        ``settings``, default the trainer's)."""
        s = settings or self.settings
        with torch.no_grad():
            before = disease_log_odds(classifier(x), positive)
        u = simulator(x, c, mask)
        simulated = warp(x, u)
        after = disease_log_odds(classifier(simulated), positive)
        back = simulator(simulated, -c, mask)  # a held outline leaves the mask valid for the result
        return simulator_objective(s, x, mask, c, before, after, u, back), before, after, u

    def fit(self, classifier: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
            positive: int, classifier_sha256: str, initial_state: dict | None = None) -> SimulatorFit:
        """images (N, 1, D, H, W) as the classifier sees them, masks (N, 1, ...) brain masks;
        ``initial_state``: a simulator's weights to start from instead of the near-identity
        initialisation. Runs the phases of the settings; of two, the first never centres the field
        and the second continues its simulator, checkpointed in ``<workdir>/second_phase``."""
        first, *rest = self.settings.phases(self.arch.centre_field)
        first_arch = replace(self.arch, centre_field=False) if rest else self.arch
        classifier = freeze(classifier.to(self.device))
        used = correctly_classified(classifier, images, labels, self.device, first.batch_size)
        if len(used) == 0:
            raise ValueError("the classifier gets no training image right: nothing to train a simulator on")
        fit = self._fit_phase(first, first_arch, self.workdir, self.name, classifier, images, masks, labels, used,
                              positive, classifier_sha256, initial_state)
        if not rest or fit.collapsed_epoch is not None:
            return fit
        LOG.info("%s: %d more epoch(s), field centred in the brain: %s, displacement weight %g", self.name,
                 rest[0].epochs, self.arch.centre_field, rest[0].displacement_weight)
        second = self._fit_phase(rest[0], self.arch, self.workdir / "second_phase" if self.workdir else None,
                                 f"{self.name} (second phase)", classifier, images, masks, labels, used, positive,
                                 classifier_sha256, fit.simulator.state_dict())
        history = fit.history + [{**row, "epoch": row["epoch"] + first.epochs} for row in second.history]
        if self.workdir:
            write_history(self.workdir / "history.tsv", history, HISTORY_COLUMNS)
        collapsed = None if second.collapsed_epoch is None else second.collapsed_epoch + first.epochs
        return SimulatorFit(second.simulator, history, second.used_index, collapsed)

    def _fit_phase(self, s: SimulatorSettings, arch: SimulatorArchitecture, workdir: Path | None, name: str,
                   classifier, images, masks, labels, used, positive, classifier_sha256, initial_state) -> SimulatorFit:
        """One phase on the correctly classified images ``used``; ``classifier`` frozen."""
        torch.manual_seed(s.seed)
        simulator = ConditionalUNet(arch)
        if initial_state is not None:
            simulator.load_state_dict(initial_state)
        simulator = simulator.to(self.device)
        optimiser = torch.optim.Adam(simulator.parameters(), lr=s.learning_rate)
        fingerprint = s.fingerprint(arch, classifier_sha256, used, initial_state)
        checkpoint = workdir / "checkpoint.safetensors" if workdir else None
        header = load_checkpoint(checkpoint, simulator, optimiser, fingerprint, name)
        history = header["history"] if header else []
        start = header["epoch"] + 1 if header else 1
        c_all = directions(labels, positive)
        collapsed = None
        for epoch in range(start, s.epochs + 1):
            simulator.train()
            sums = {k: 0.0 for k in HISTORY_COLUMNS[1:]}
            order = _epoch_order(used, s.seed, epoch)
            bar = tqdm(list(_batches(order, s.batch_size)), desc=f"{name} epoch {epoch}/{s.epochs}",
                       leave=False, disable=not s.progress, unit="batch")
            for batch in bar:
                x, m = images[batch].to(self.device), masks[batch].to(self.device)
                c = c_all[batch].to(self.device)
                terms, before, after, u = self.step_losses(simulator, classifier, x, m, c, positive, s)
                terms["loss"].mean().backward()
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                for key, value in terms.items():
                    sums[key] += float(value.detach().sum())
                flipped = ((before > 0) != (after.detach() > 0)).float()
                sums["flip_fraction"] += float(flipped.sum())
                sums["mean_displacement_voxels"] += float(u.detach().norm(dim=1).mean(dim=(1, 2, 3)).sum())
                sums["folded_fraction"] += sum(folded_fraction(u.detach()[i:i + 1], m[i:i + 1]) for i in range(len(batch)))
            row = {"epoch": epoch, **{k: v / len(used) for k, v in sums.items()}}
            history.append(row)
            LOG.info("%s epoch %d/%d: %s", name, epoch, s.epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if workdir:
                save_checkpoint(checkpoint, simulator, optimiser, {"epoch": epoch, "history": history,
                                                                   "fingerprint": fingerprint})
                write_history(workdir / "history.tsv", history, HISTORY_COLUMNS)
            if self._collapsed(simulator, images, masks, used, c_all):
                collapsed = epoch
                LOG.warning("%s: after epoch %d the simulator gives every input the same field; stopping. "
                            "Use another --learning-rate (now %g) or --seed.", name, epoch, s.learning_rate)
                break
        simulator.eval()
        return SimulatorFit(simulator.cpu(), history, used, collapsed)

    @torch.no_grad()
    def _collapsed(self, simulator, images, masks, used, c_all, n: int = 4) -> bool:
        """Dead-network check: the fields of a few inputs (with their direction) are identical."""
        index = used[:n]
        if len(index) < 2:
            return False
        simulator.eval()
        fields = simulator(images[index].to(self.device), c_all[index].to(self.device), masks[index].to(self.device))
        return output_collapsed(fields.flatten(1).cpu().numpy())
