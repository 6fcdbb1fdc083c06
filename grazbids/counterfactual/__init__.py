"""Counterfactual warp simulator (Liu, Adeli, Pohl, Zhao, IPMI 2021).

A conditional 3D U-Net warps an MRI so that a frozen grazbids classifier changes its
decision: inject the disease pattern (c = +1) or remove it (c = -1). The explanation is
the log-Jacobian of the warp (local volume change). Distinct from ``grazbids.simulate``,
which simulates cohorts. Modules: conditional (conditional convolution), network
(U-Net), warp (spatial transformer, scaling and squaring, Jacobian), losses, training,
bundle (safetensors + card), apply, run (train/apply a bundle), cohort, __main__ (CLI).
"""
from .bundle import SimulatorBundleError, has_simulator, load_simulator, save_simulator
from .conditional import ConditionalConv3d
from .network import ConditionalUNet, SimulatorArchitecture
from .training import SimulatorSettings, SimulatorTrainer
from .warp import folded_fraction, integrate_velocity, jacobian_determinant, log_volume_change, warp

__all__ = [
    "ConditionalConv3d", "ConditionalUNet", "SimulatorArchitecture", "SimulatorSettings", "SimulatorTrainer",
    "SimulatorBundleError", "has_simulator", "load_simulator", "save_simulator",
    "warp", "integrate_velocity", "jacobian_determinant", "log_volume_change", "folded_fraction",
]
