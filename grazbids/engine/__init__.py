"""The Graz+ engine: model, z+ LRP, training modes, trainer, model bundles.

Usable from Python without the BIDS layer::

    from grazbids.engine import Architecture, build_model, zplus_heatmap
"""
from .allocator import keep_freed_memory

keep_freed_memory()  # large activations: reuse freed memory instead of page-faulting it in again

from .cohort_cache import CohortCache, CohortCacheError, build_cohort_cache, mean_image, open_or_build_cohort_cache
from .bundle import ModelBundleError, ModelBundleMissing, check_bundle, load_bundle, read_card, save_bundle
from .data import balanced_accuracy, class_weights, encode_labels, participant_folds
from .device import resolve_device
from .losses import compute_loss
from .modes import MODES, model_input
from .lrp import masked_relevance, start_relevance, zplus_heatmap
from .architectures import KondratevaNet, build_model, kondrateva_architecture
from .model import Architecture, GrazPlusNet
from .normalize import IntensityNormalisation
from .trainer import FitResult, Trainer, TrainingData, TrainSettings

__all__ = [
    "Architecture", "GrazPlusNet", "build_model", "KondratevaNet", "kondrateva_architecture",
    "zplus_heatmap", "masked_relevance", "start_relevance",
    "MODES", "model_input", "compute_loss",
    "Trainer", "TrainSettings", "TrainingData", "FitResult",
    "CohortCache", "CohortCacheError", "build_cohort_cache", "open_or_build_cohort_cache", "mean_image",
    "save_bundle", "load_bundle", "read_card", "check_bundle", "ModelBundleError", "ModelBundleMissing",
    "IntensityNormalisation", "encode_labels", "class_weights", "participant_folds",
    "balanced_accuracy", "resolve_device",
]
