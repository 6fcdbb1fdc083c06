"""Post-hoc explanation methods for 3D CNNs on brain MRI.

One entry point and a registry::

    from grazbids.explain import METHODS, describe, explain

    relevance = explain(model, x, "composite", target="predicted")   # shaped like x
    sidecar = describe("composite", {"alpha": 2.0})                   # JSON-ready

Methods (``METHODS``): LRP with the rules ``zplus``, ``epsilon``, ``alpha1beta0``,
``alpha2beta1``, ``alphabeta`` and ``composite`` (any plain chain of standard layers, see
``graph.py``); ``gradcam``; ``guided_backprop``; ``gradient``; ``gradient_x_input``;
``integrated_gradients``; ``meaningful_perturbation``. The caller's model is never
changed: modules run in eval mode temporarily, hooks are removed in ``finally`` blocks.
"""
from .graph import SUPPORTED_MODULES, UnsupportedModelError, layer_chain
from .registry import METHODS, Method, describe, explain

__all__ = ["explain", "describe", "METHODS", "Method", "layer_chain", "SUPPORTED_MODULES", "UnsupportedModelError"]
