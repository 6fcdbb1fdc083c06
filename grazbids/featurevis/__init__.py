"""Feature visualisation (activation maximisation) for 3D CNNs (Eitel et al. 2022).

Optimise an input image so that a class logit, a channel of a Conv3d layer or one unit
is as large as possible, with selectable regularisers::

    from grazbids.featurevis import AscentSettings, Regularisers, class_objective, maximise
    result = maximise(model, class_objective("AD", card["classes"]),
                      AscentSettings(iterations=200, regularisers=Regularisers(tv=0.1)),
                      mask=brain_mask)

``visualise_bundle`` does this for a model bundle on its template grid and writes a
NIfTI, a JSON sidecar and a PNG figure; ``python -m grazbids.featurevis --help``.
"""
from .ascent import AscentResult, AscentSettings, maximise
from .objectives import Channel, ClassLogit, Neuron, ObjectiveError, class_objective, feature_layers
from .parameterisation import FourierParameterisation, PixelParameterisation, spectrum_scale
from .regularisers import Regularisers, gaussian_blur, total_variation
from .from_bundle import FeatureVisOutputs, visualise_bundle

__all__ = [
    "AscentResult", "AscentSettings", "maximise",
    "Channel", "ClassLogit", "Neuron", "ObjectiveError", "class_objective", "feature_layers",
    "FourierParameterisation", "PixelParameterisation", "spectrum_scale",
    "Regularisers", "gaussian_blur", "total_variation",
    "FeatureVisOutputs", "visualise_bundle",
]
