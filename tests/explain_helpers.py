"""Small models for the explanation tests and an independent brute-force LRP in numpy."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grazbids.engine import Architecture, build_model


def tiny_kondrateva(shape=(8, 8, 8), n_classes=3, channels=3, dense_units=5, seed=0, zero_biases=False):
    """A Kondrateva-style network with batch-norm statistics that do something."""
    torch.manual_seed(seed)
    model = build_model(Architecture(shape, n_classes=n_classes, channels=channels, n_blocks=2,
                                     dense_units=dense_units, name="kondrateva")).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.3)
                if zero_biases:
                    module.running_mean.zero_()
                    module.bias.zero_()
            if isinstance(module, (nn.Conv3d, nn.Linear)) and zero_biases:
                module.bias.zero_()
    return model.eval()


def pooled_sequential(seed=0):
    """Conv-BN-ReLU-AvgPool, strided conv, global average pooling, linear (3 classes, 8^3 input)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(), nn.AvgPool3d(2),
        nn.Conv3d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
        nn.Flatten(), nn.Linear(4, 3),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


# ---- brute force ------------------------------------------------------------------------

def unrolled(fn, in_shape):
    """An affine torch function (no batch axis in in_shape) as a dense matrix and offset:
    f(v) = W v + b, from the responses to the zero vector and to every basis vector."""
    n_in = int(np.prod(in_shape))
    with torch.no_grad():
        offset = fn(torch.zeros(1, *in_shape, dtype=torch.float64))
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
        out = fn(basis) - offset
    return out.reshape(n_in, -1).T.numpy(), offset.reshape(-1).numpy(), tuple(out.shape[1:])


def _safe_div(num, den):
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def redistribute(rule, W, b, conn, a, R, params):
    """One weighted layer's rule with explicit per-connection contributions (out x in)."""
    if rule == "zplus":
        C = np.maximum(W, 0) * a[None, :]
        return C.T @ _safe_div(R, C.sum(axis=1))
    if rule == "epsilon":
        C = W * a[None, :]
        z = C.sum(axis=1) + b
        return C.T @ (R / (z + params["eps"] * np.where(z >= 0, 1.0, -1.0)))
    if rule == "alphabeta":
        P, N = np.maximum(W * a[None, :], 0), np.minimum(W * a[None, :], 0)
        zp, zn = P.sum(axis=1) + np.maximum(b, 0), N.sum(axis=1) + np.minimum(b, 0)
        return params["alpha"] * P.T @ _safe_div(R, zp) - params["beta"] * N.T @ _safe_div(R, zn)
    if rule == "zbeta":
        C = W * a[None, :] - np.maximum(W, 0) * params["low"] - np.minimum(W, 0) * params["high"]
        return C.T @ _safe_div(R, C.sum(axis=1))
    if rule == "flat":
        return conn.T @ _safe_div(R, conn.sum(axis=1))
    raise ValueError(rule)


def ops_of(model, in_shape):
    """The model as explicit ops, written out by hand per model type (independent of
    grazbids.explain.graph): ("affine", W, b, conn, is_conv), ("relu",), ("max", windows),
    ("avg", P). Flatten is a no-op on raveled vectors."""
    ops, shape = [], tuple(in_shape)

    def affine(fn, ones_fn, is_conv):
        nonlocal shape
        W, b, out_shape = unrolled(fn, shape)
        conn = (np.abs(unrolled(ones_fn, shape)[0]) > 0).astype(float)
        ops.append(("affine", W, b, conn, is_conv))
        shape = out_shape

    def conv_fn(conv, norm=None):
        def fn(v):
            out = conv(v)
            return norm(out) if norm is not None else out
        ones = lambda v: F.conv3d(v, torch.ones_like(conv.weight), None, conv.stride, conv.padding)
        return fn, ones

    def linear_fn(lin):
        return (lambda v: lin(v.flatten(1))), (lambda v: v.flatten(1) @ torch.ones_like(lin.weight).T)

    def pool(kind, module):
        nonlocal shape
        P, _, out_shape = unrolled(lambda v: F.avg_pool3d(v, module.kernel_size) if kind == "max" else module(v), shape)
        ops.append((kind, P))
        shape = out_shape

    if hasattr(model, "lrp_layers"):  # GrazPlusNet: conv/dense layers with ReLU between
        layers = model.lrp_layers()
        for i, layer in enumerate(layers):
            affine(*(conv_fn(layer) if isinstance(layer, nn.Conv3d) else linear_fn(layer)), isinstance(layer, nn.Conv3d))
            if i < len(layers) - 1:
                ops.append(("relu",))
        return ops
    modules = list(model.modules())[1:]
    modules = [m for m in modules if not list(m.children())]
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, nn.Conv3d):
            norm = modules[i + 1] if isinstance(modules[i + 1], nn.BatchNorm3d) else None
            affine(*conv_fn(m, norm), True)
            i += 1 if norm is not None else 0
        elif isinstance(m, nn.Linear):
            affine(*linear_fn(m), False)
        elif isinstance(m, nn.ReLU):
            ops.append(("relu",))
        elif isinstance(m, nn.MaxPool3d):
            pool("max", m)
        elif isinstance(m, (nn.AvgPool3d, nn.AdaptiveAvgPool3d)):
            pool("avg", m)
        elif isinstance(m, nn.Flatten):
            shape = (int(np.prod(shape)),)
        i += 1
    return ops


def brute_force_lrp(model, x, rule_of, start, ops=None):
    """LRP of one sample x (C, D, H, W): ``rule_of(is_conv, is_first) -> (rule, params)``,
    ``start(logits) -> output relevance``; ``ops``: ``ops_of(model, x.shape)``, if at hand."""
    ops = ops_of(model, x.shape) if ops is None else ops
    a = x.numpy().ravel()
    inputs = []
    for op in ops:
        inputs.append(a)
        if op[0] == "affine":
            a = op[1] @ a + op[2]
        elif op[0] == "relu":
            a = np.maximum(a, 0)
        elif op[0] == "max":
            windows = op[1] > 0
            a = np.array([a[row].max() for row in windows])
        else:
            a = op[1] @ a
    logits = a
    R = start(logits)
    first = next(k for k, op in enumerate(ops) if op[0] == "affine")
    for k in reversed(range(len(ops))):
        op, a = ops[k], inputs[k]
        if op[0] == "affine":
            rule, params = rule_of(op[4], k == first)
            R = redistribute(rule, op[1], op[2], op[3], a, R, params)
        elif op[0] == "max":  # winner takes all
            R_in = np.zeros_like(a)
            for j, row in enumerate(op[1] > 0):
                idx = np.flatnonzero(row)
                R_in[idx[np.argmax(a[idx])]] += R[j]
            R = R_in
        elif op[0] == "avg":  # proportional
            C = op[1] * a[None, :]
            R = C.T @ _safe_div(R, C.sum(axis=1))
    return R.reshape(x.shape), logits


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()
