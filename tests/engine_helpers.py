"""Small models and data shared by the engine tests."""
import torch

from grazbids.engine import Architecture, build_model


def tiny_model(shape=(8, 7, 6), n_classes=3, n_blocks=2, channels=3, seed=0, dtype=torch.float64):
    """A small Graz+ network with random non-positive biases (as training leaves them)."""
    torch.manual_seed(seed)
    model = build_model(Architecture(shape, n_classes=n_classes, n_blocks=n_blocks, channels=channels)).to(dtype)
    with torch.no_grad():
        for layer in model.lrp_layers():
            layer.bias.uniform_(-0.05, 0.0)
    return model


def shortcut_task(n=48, size=16, correlation=1.0, seed=0):
    """Label decided by a blob inside the 'brain'; a bright block outside it agrees with
    the label with probability ``correlation`` (the shortcut Graz+ is meant to ignore)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 1, size, size, size)
    masks = torch.zeros_like(images)
    lo, hi = size // 4, size - size // 4
    masks[:, :, lo:hi, lo:hi, lo:hi] = 1
    images += masks * (0.4 + 0.1 * torch.rand(images.shape, generator=g))
    c = size // 2
    for i in range(n):
        if labels[i] == 1:  # the true effect: a bright blob inside the brain
            images[i, 0, c - 2:c + 1, c - 2:c + 1, c:c + 3] = 1.0
        shortcut = labels[i] if torch.rand(1, generator=g) < correlation else 1 - labels[i]
        if shortcut == 1:  # the shortcut: a bright block in the background corner
            images[i, 0, :3, :3, :3] = 1.0
    return images, masks, labels
