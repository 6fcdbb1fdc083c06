"""Decision dependence measures reliance, whatever the heat map says."""
import numpy as np
import torch
from torch import nn

from grazbids.explain import explain
from grazbids.explain.dependence import decision_dependence, replace_region

SHAPE = (8, 8, 8)


def _brain() -> torch.Tensor:
    brain = torch.zeros(1, 1, *SHAPE)
    brain[..., 2:6, 2:6, 2:6] = 1
    return brain


class Reader(nn.Module):
    """Both logits share a large brain-wide term; only their difference decides. ``outside``:
    the difference comes from the mean intensity outside the brain (a shortcut);
    otherwise from the mean intensity inside it."""

    def __init__(self, outside: bool):
        super().__init__()
        brain = _brain()
        self.register_buffer("brain", brain)
        self.register_buffer("decider", 1 - brain if outside else brain)

    def forward(self, x):
        common = 100 * (x * self.brain).flatten(1).mean(1)
        decisive = (x * self.decider).flatten(1).sum(1) / self.decider.sum()
        return torch.stack([common + 0.5, common + decisive], dim=1)


def _cohort(n=12, seed=0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    brain = _brain()
    inside = 0.8 + 0.4 * torch.rand(n, 1, *SHAPE, generator=rng)
    outside = 0.6 + 0.4 * torch.rand(n, 1, *SHAPE, generator=rng)  # class 1 from the outside reader
    return inside * brain + outside * (1 - brain)


def test_a_model_reading_only_outside_flips_whatever_its_relevance_share():
    x, brain = _cohort(), _brain()
    model = Reader(outside=True)
    assert (model(x).argmax(1) == 1).all()
    relevance = explain(model, x, "gradient_x_input", target=1).clamp_min(0)
    share_inside = float((relevance * brain).sum() / relevance.sum())
    assert share_inside > 0.9  # the map says "brain" ...
    result = decision_dependence(model, x, 1 - brain, 0.0)
    assert result.flipped.mean() == 1.0  # ... the decision says "outside"
    assert (result.change < -0.15).all()  # p(class 1): ~0.57 -> 0.38


def test_a_model_ignoring_the_outside_never_flips():
    x, brain = _cohort(), _brain()
    model = Reader(outside=False)
    for fill in (0.0, x.mean(0, keepdim=True)):
        result = decision_dependence(model, x, 1 - brain, fill)
        assert result.flipped.sum() == 0
        np.testing.assert_allclose(result.change, 0, atol=1e-6)


def test_masked_input_cannot_depend_on_the_outside():
    x, brain = _cohort(), _brain()
    result = decision_dependence(Reader(outside=True), x, 1 - brain, 0.0, prepare=lambda images: images * brain)
    assert result.flipped.sum() == 0


def test_replace_region_blends_soft_regions():
    x = torch.ones(1, 1, 2, 2, 2)
    region = torch.zeros_like(x)
    region[..., 0, 0, 0] = 1
    region[..., 1, 1, 1] = 0.5
    out = replace_region(x, region, 3.0)
    assert out[..., 0, 0, 0] == 3.0 and out[..., 1, 1, 1] == 2.0 and out[..., 0, 1, 0] == 1.0
