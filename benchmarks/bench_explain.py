"""Cost of every explanation method relative to one plain forward + backward pass.

    python benchmarks/bench_explain.py [--device cpu|cuda] [--repeats 3] [--iterations 10] [--ig-steps 50]

Graz+ architecture (default ``Architecture``) on the 2 mm template grid (97x115x97),
batch 1. The reference ("fwd+bwd") is one forward pass and the backward pass of the
predicted logit into the weights, as in a training step without the optimiser. Every
method of ``grazbids.explain.METHODS`` with its defaults, plus the engine's z+ heat map
(``zplus_heatmap`` under ``inference_mode``), is timed side by side: each repeat runs
every method once, in turn (interleaved, so slow phases of a shared machine hit all of
them alike), and the table shows the median. Meaningful perturbations run
``--iterations`` iterations (the method's default is 300): the table reports the cost
per iteration and the extrapolation to 300. Integrated gradients use ``--ig-steps``.
The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from grazbids.engine import Architecture, build_model, zplus_heatmap
from grazbids.explain import METHODS, explain

GRID_2MM = (97, 115, 97)
MP_DEFAULT_ITERATIONS = METHODS["meaningful_perturbation"].defaults["iterations"]


def reference_pass(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits[0, int(logits[0].argmax())].backward()
    return run


def method_runs(model, x, iterations: int, ig_steps: int) -> dict:
    runs = {"fwd+bwd": reference_pass(model, x)}

    def engine_zplus():
        with torch.inference_mode():
            zplus_heatmap(model, x)

    runs["engine zplus_heatmap"] = engine_zplus
    for name in METHODS:
        params = {}
        if name == "meaningful_perturbation":
            params = {"iterations": iterations}
        elif name == "integrated_gradients":
            params = {"steps": ig_steps}
        target = "softmax" if METHODS[name].family == "lrp" else "predicted"
        runs[name] = (lambda n=name, p=params, t=target: explain(model, x, n, target=t, **p))
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10, help="meaningful-perturbation iterations (default 10)")
    parser.add_argument("--ig-steps", type=int, default=50, help="integrated-gradients steps (default 50)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model(Architecture(GRID_2MM)).to(device).eval()
    with torch.no_grad():
        for layer in model.lrp_layers():  # as training leaves them: biases <= 0
            layer.bias.uniform_(-0.05, 0.0)
    x = torch.rand(1, 1, *GRID_2MM, device=device)

    runs = method_runs(model, x, args.iterations, args.ig_steps)
    for fn in runs.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    reference = median["fwd+bwd"]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"grid {GRID_2MM}, batch 1, Graz+ architecture; median of {args.repeats} interleaved repeats")
    print(f"{'method':<26} {'seconds':>9} {'x fwd+bwd':>10}")
    for name, seconds in median.items():
        label = name
        if name == "meaningful_perturbation":
            label = f"{name} ({args.iterations} it)"
        elif name == "integrated_gradients":
            label = f"{name} ({args.ig_steps} steps)"
        print(f"{label:<26} {seconds:9.3f} {seconds / reference:10.2f}")
    per_iteration = median["meaningful_perturbation"] / max(args.iterations, 1)
    print(f"meaningful_perturbation: {per_iteration:.3f} s per iteration = {per_iteration / reference:.2f}x fwd+bwd; "
          f"{MP_DEFAULT_ITERATIONS} iterations ~ {per_iteration * MP_DEFAULT_ITERATIONS:.0f} s per volume")
    summary = {
        "device": str(device), "repeats": args.repeats, "fwd_bwd_s": round(reference, 4),
        "ratios": {name: round(seconds / reference, 3) for name, seconds in median.items()},
        "mp_iterations": args.iterations, "mp_s_per_iteration": round(per_iteration, 4),
        "ig_steps": args.ig_steps,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
