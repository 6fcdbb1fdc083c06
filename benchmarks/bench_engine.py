"""Speed and memory of the Graz+ engine, measured side by side in one run.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--repeats 5] [--skip-1mm]

Same model (Graz+ architecture) and batch (2 mm template grid 97x115x97, batch 2) for:
  plain               one Adam step on cross-entropy, default memory format
  plain_channels_last the same with model and input channels-last
  grazplus            one Adam step on CE - sum(mask * R) through masked_relevance
  grazplus_invariance the same plus the invariance penalty (the group level's default)
  naive               (--naive) the same loss with z+ through autograd.grad(create_graph=True)
  heatmap             the full z+ map (zplus_heatmap) under torch.inference_mode
and, with --compile, the plain and Graz+ steps through torch.compile (compile time
printed). The reference of every ratio is the FASTEST plain step (either format).
Each repeat runs every variant once in turn (interleaved, so load from other jobs hits
all of them alike); times are the minimum over repeats. Peak memory of one Graz+ step
at 1 mm (197x233x189, batch 1 and 2) is measured in fresh subprocesses.
The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from grazbids.engine import Architecture, allocator, build_model, masked_relevance, pointwise, zplus_heatmap
from grazbids.engine.guidance import invariance_penalty
from grazbids.engine.lrp import start_relevance

GRID_2MM = (97, 115, 97)
GRID_1MM = (197, 233, 189)
LOAD_BEFORE = f"{os.getloadavg()[0]:.2f}"


def naive_masked_relevance(model, x, mask):
    """z+ LRP by the gradient trick: c = d(z+ . s)/da, kept differentiable via create_graph."""
    layers = model.lrp_layers()
    inputs, a = [], x.requires_grad_(True) if not x.requires_grad else x
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Linear) and a.dim() > 2:
            a = a.flatten(1)
        inputs.append(a)
        a = layer(a)
        a = torch.relu(a) if i < len(layers) - 1 else a
    logits = a
    relevance = start_relevance(logits)
    for layer, a in zip(reversed(layers), reversed(inputs)):
        wp = layer.weight.clamp(min=0)
        if isinstance(layer, torch.nn.Conv3d):
            z = F.conv3d(a, wp, None, layer.stride, layer.padding)
        else:
            z = F.linear(a, wp)
        relevance = relevance.reshape(z.shape)
        s = relevance / (z + (z == 0).to(z.dtype))
        (c,) = torch.autograd.grad(z, a, grad_outputs=s, create_graph=True)
        relevance = a * c
    return logits, (relevance.reshape(x.shape) * mask).sum(dim=(1, 2, 3, 4))


def make_steps(model, x, mask, y, compile_fns=False, naive=False):
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    optimiser_cl = torch.optim.Adam(model_cl.parameters(), lr=1e-4)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)

    def plain_loss(x, mask, y):
        return F.cross_entropy(model(x), y)

    def plain_cl_step():
        optimiser_cl.zero_grad(set_to_none=True)
        F.cross_entropy(model_cl(x_cl), y).backward()
        optimiser_cl.step()
        model_cl.project_biases_()

    def graz_loss(x, mask, y):
        logits, inside, _ = masked_relevance(model, x, mask)
        return F.cross_entropy(logits, y) - inside.mean()

    def graz_invariance_loss(x, mask, y):  # the group level's default Graz+ step (docs/simulation.md)
        logits, inside, _ = masked_relevance(model, x, mask)
        return F.cross_entropy(logits, y) - inside.mean() + invariance_penalty(model, x, 1 - mask, logits).mean()

    def naive_loss(x, mask, y):
        logits, inside = naive_masked_relevance(model, x.clone(), mask)
        return F.cross_entropy(logits, y) - inside.mean()

    def step(loss_fn):
        def run():
            optimiser.zero_grad(set_to_none=True)
            loss_fn(x, mask, y).backward()
            optimiser.step()
            model.project_biases_()
        return run

    def heatmap():
        with torch.inference_mode():
            zplus_heatmap(model, x)

    steps = {"plain": step(plain_loss), "plain_channels_last": plain_cl_step, "grazplus": step(graz_loss),
             "grazplus_invariance": step(graz_invariance_loss), "heatmap": heatmap}
    if naive:
        steps["naive"] = step(naive_loss)
    if compile_fns:
        steps["plain_compiled"] = step(torch.compile(plain_loss))
        steps["grazplus_compiled"] = step(torch.compile(graz_loss))
    return steps


def timed_interleaved(steps: dict, repeats: int, sync) -> tuple[dict, dict]:
    """Min time per step over ``repeats`` rounds of every step in turn; the first call
    (warm-up, and compilation for compiled steps) is timed separately."""
    first, best, failed = {}, {}, set()
    for name, fn in steps.items():
        start = time.perf_counter()
        try:
            fn()
            sync()
        except Exception as err:  # e.g. no C++ compiler for torch.compile
            print(f"{name}: failed ({str(err).splitlines()[0][:120]})", file=sys.stderr)
            failed.add(name)
            continue
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in steps.items():
            if name in failed:
                continue
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best, first


def peak_memory_1mm(device: str, batch: int = 1) -> tuple[float, float]:
    """Peak memory (MB) of one Graz+ training step at 1 mm in a fresh process, and the
    process's memory before the step."""
    code = f"""
import torch, torch.nn.functional as F
from grazbids.engine import Architecture, build_model, masked_relevance
def hwm():  # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's)
    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
    return int(line.split()[1]) / 1024
dev = torch.device({device!r})
model = build_model(Architecture({GRID_1MM!r})).to(dev)
opt = torch.optim.Adam(model.parameters(), 1e-4)
x = torch.rand({batch}, 1, *{GRID_1MM!r}, device=dev); m = (x > 0.3).float(); y = torch.arange({batch}, device=dev) % 2
base = hwm()
logits, inside, _ = masked_relevance(model, x, m)
(F.cross_entropy(logits, y) - inside.mean()).backward(); opt.step()
if dev.type == 'cuda':
    torch.cuda.synchronize(); print(torch.cuda.max_memory_allocated() / 2**20, base)
else:
    print(hwm(), base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, base = (float(v) for v in out.stdout.split())
    return peak, base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-1mm", action="store_true", help="skip the 1 mm peak-memory measurement")
    parser.add_argument("--naive", action="store_true",
                        help="also time the naive autograd.grad(create_graph=True) formulation (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the plain and Graz+ steps through torch.compile")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model(Architecture(GRID_2MM)).to(device)
    x = torch.rand(2, 1, *GRID_2MM, device=device)
    mask = (torch.rand_like(x) > 0.3).float()
    y = torch.tensor([0, 1], device=device)

    # the naive formulation must agree with ours before its time means anything
    with torch.no_grad():
        ours = masked_relevance(model, x, mask)[1]
    theirs = naive_masked_relevance(model, x.clone(), mask)[1].detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)

    steps = make_steps(model, x, mask, y, compile_fns=args.compile, naive=args.naive)
    results, first = timed_interleaved(steps, args.repeats, sync)
    forward = pointwise.fused_step_forward  # did the default Graz+ step run compiled kernels?
    fused_kind = "compiled" if forward.enabled and forward.compiled is not None and device.type == "cpu" else "eager"
    plain = min(results["plain"], results["plain_channels_last"])
    reference = "plain" if results["plain"] <= results["plain_channels_last"] else "plain_channels_last"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    if device.type == "cpu":
        print(f"load average before/after: {LOAD_BEFORE} / {os.getloadavg()[0]:.2f} (other jobs on this machine)")
    print(f"grid {GRID_2MM}, batch 2, Graz+ architecture; min of {args.repeats} interleaved repeats; "
          f"reference: {reference} (the fastest plain step)")
    print(f"engine: elementwise kernels {fused_kind}, allocator keeps freed memory: {allocator.keep_freed_memory()}")
    for name, seconds in results.items():
        extra = f"   first call {first[name]:.1f} s (compilation)" if name.endswith("_compiled") else ""
        print(f"  {name:<20} {seconds:8.3f} s   {seconds / plain:5.2f}x fastest plain{extra}")
    summary = {
        "device": str(device),
        "elementwise": fused_kind,
        "reference": reference,
        "plain_step_s": round(results["plain"], 4),
        "plain_channels_last_step_s": round(results["plain_channels_last"], 4),
        "grazplus_step_s": round(results["grazplus"], 4),
        "step_ratio": round(results["grazplus"] / plain, 3),
        "grazplus_invariance_step_s": round(results["grazplus_invariance"], 4),
        "invariance_step_ratio": round(results["grazplus_invariance"] / plain, 3),
        "heatmap_s": round(results["heatmap"], 4),
        "heatmap_ratio": round(results["heatmap"] / plain, 3),
    }
    if "naive" in results:
        summary["naive_step_ratio"] = round(results["naive"] / plain, 3)
    if "grazplus_compiled" in results:
        summary["grazplus_compiled_step_s"] = round(results["grazplus_compiled"], 4)
        summary["compiled_step_ratio"] = round(results["grazplus_compiled"] / plain, 3)
        summary["compile_s"] = round(first["grazplus_compiled"], 1)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if not args.skip_1mm:
        key = "peak_gpu_mb_1mm" if device.type == "cuda" else "peak_rss_mb_1mm"
        for batch in (1, 2):
            peak, base = peak_memory_1mm(args.device, batch)
            summary[f"{key}_batch{batch}"] = round(peak, 1)
            summary[f"before_step_mb_1mm_batch{batch}"] = round(base, 1)
            print(f"one Graz+ step at 1 mm {GRID_1MM}, batch {batch}: peak {peak:.0f} MB "
                  f"(process before the step: {base:.0f} MB)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
