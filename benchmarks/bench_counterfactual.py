"""Speed of the counterfactual warp simulator, side by side with a plain classifier step.

    python benchmarks/bench_counterfactual.py [--device cpu|cuda] [--repeats 3] [--threads N]

On the 2 mm template grid (97x115x97), batch 2, Graz+ classifier architecture:
  plain              one Adam step of the classifier on cross-entropy: the reference, the
                     faster of contiguous and channels-last memory layout
  sim_step           one simulator training step (U-Net on the grid / 2, warp, frozen
                     classifier forward + backward, the cycle pass, Adam)
  sim_step_full      the same with the U-Net at full resolution (--field-downsample 1)
  sim_step_diffeo    the default step with scaling and squaring (7 steps)
  sim_step_centred   the default step with the field centred in the brain (the second
                     training phase, and every step of the saved simulator's inference)
  sim_apply          inject + remove for one image under inference_mode (what the
                     participant level runs per participant)
Times are the minimum over repeats (the machine is noisy); the ratios are what matter.
The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from grazbids.counterfactual import ConditionalUNet, SimulatorArchitecture, SimulatorSettings, SimulatorTrainer
from grazbids.counterfactual.apply import counterfactuals
from grazbids.counterfactual.training import freeze
from grazbids.engine import Architecture, build_model

GRID_2MM = (97, 115, 97)


def timed(fn, repeats, sync):
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def plain_step(model, x, y):
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)

    def run():
        optimiser.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return run


def simulator_step(classifier, x, mask, c, device, **arch_options):
    arch = SimulatorArchitecture(GRID_2MM, **arch_options)
    trainer = SimulatorTrainer(arch, SimulatorSettings(device=str(device), progress=False))
    simulator = ConditionalUNet(arch).to(device)
    optimiser = torch.optim.Adam(simulator.parameters(), lr=1e-3)

    def run():
        terms, *_ = trainer.step_losses(simulator, classifier, x, mask, c, positive=1)
        terms["loss"].mean().backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return run, simulator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-resolution U-Net step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.rand(2, 1, *GRID_2MM, device=device)
    mask = (torch.rand_like(x) > 0.3).float()
    y = torch.tensor([0, 1], device=device)
    c = torch.tensor([1.0, -1.0], device=device)

    results = {}
    model = build_model(Architecture(GRID_2MM)).to(device)
    results["plain"] = timed(plain_step(model, x, y), args.repeats, sync)
    model_cl = build_model(Architecture(GRID_2MM)).to(device).to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    results["plain_channels_last"] = timed(plain_step(model_cl, x_cl, y), args.repeats, sync)
    reference = min(results["plain"], results["plain_channels_last"])

    classifier = freeze(build_model(Architecture(GRID_2MM)).to(device))
    run, simulator = simulator_step(classifier, x, mask, c, device)
    results["sim_step"] = timed(run, args.repeats, sync)
    run_d, _ = simulator_step(classifier, x, mask, c, device, diffeomorphic=True)
    results["sim_step_diffeo"] = timed(run_d, args.repeats, sync)
    run_c, _ = simulator_step(classifier, x, mask, c, device, centre_field=True)
    results["sim_step_centred"] = timed(run_c, args.repeats, sync)
    if not args.skip_full:
        run_f, _ = simulator_step(classifier, x, mask, c, device, field_downsample=1)
        results["sim_step_full"] = timed(run_f, args.repeats, sync)
    simulator.eval()
    results["sim_apply"] = timed(lambda: counterfactuals(classifier, simulator, x[:1], mask[:1], 1), args.repeats, sync)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"grid {GRID_2MM}, batch 2 (sim_apply: 1 image, both directions); min of {args.repeats} repeats; "
          f"reference = fastest plain step ({reference:.3f} s)")
    for name, seconds in results.items():
        print(f"  {name:<20} {seconds:8.3f} s   {seconds / reference:6.2f}x plain")
    summary = {"device": str(device), "plain_step_s": round(reference, 4),
               **{f"{k}_s": round(v, 4) for k, v in results.items() if not k.startswith("plain")},
               **{f"{k}_ratio": round(v / reference, 3) for k, v in results.items() if not k.startswith("plain")}}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
