"""Simulated BIDS cohorts with a known disease effect and shortcut confounds.

``grazbids-simulate OUT`` (or ``python -m grazbids.simulate OUT``) writes a raw BIDS
dataset of T1w scans, patients with a known effect (atrophy or lesion at documented MNI
coordinates) and a label-correlated confound outside the brain, with the ground truth in
``OUT/derivatives/simulation``. See docs/simulation.md.

Modules: `regions` (where effects go), `effects` (atrophy, lesion), `deformation`
(grid, pose, smooth random fields), `anatomy` (source brains, registration),
`confounds` (shortcut confounds and their assignment), `acquisition` (bias, noise,
scaling), `participant` (one scan), `layout` (BIDS files), `cohort` (orchestration),
`config` (parameters), `cli` (command line).
"""
from .cohort import CohortResult, plan_cohort, simulate_cohort
from .config import SimulationConfig

__all__ = ["CohortResult", "SimulationConfig", "plan_cohort", "simulate_cohort"]
