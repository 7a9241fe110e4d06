#!/usr/bin/env python3
"""Where one training step's GPU time goes: torch.profiler over a few steps, the top kernels printed.

    python tools/profile_step.py --arch mamba_small --batch_size 512 --compile

The model is tokenized as training tokenizes it from scratch (the conv stem at stride 2: 257 tokens) unless --stem or
--patch_size say otherwise; the last two lines give the selective scan's and the mixer's convs' shares of the GPU
time.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.bimamba import use_causal_conv1d  # noqa: E402
from models.scan import SCAN_CHOICES, resolve_scan  # noqa: E402
from models.vim import build_model  # noqa: E402
from training.config import DEFAULT_PATCH_SIZE  # noqa: E402
from training.data import MEAN_STD  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.step import TrainStep  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mamba_small")
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--stem", default="conv", choices=("conv", "patch"), help="the tokenizer (default: training's)")
    p.add_argument("--patch_size", type=int, default=None,
                   help="patch size, or the conv stem's stride (default: training's, 2 with the conv stem)")
    p.add_argument("--scan", default="auto", choices=SCAN_CHOICES)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    patch = DEFAULT_PATCH_SIZE[args.stem] if args.patch_size is None else args.patch_size
    model = build_model(args.arch, 10, patch_size=patch, stem=args.stem).to(device)
    scan = resolve_scan(args.scan, device)
    model.set_kernels(scan, use_causal_conv1d(scan, args.compile))
    opt = build_optimizer(model, 1e-3, 0.05, device)
    mean, std = MEAN_STD["cifar10"]
    step = TrainStep(model, opt, num_classes=10, mean=mean, std=std, amp=True,
                     train_model=torch.compile(model) if args.compile else model)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    for _ in range(5):
        step([(x, y)], 1e-3)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step([(x, y)], 1e-3)
        torch.cuda.synchronize()
    print(f"{args.arch} batch {args.batch_size} {model.cfg.num_patches + 1} tokens ({args.stem} stem) scan {scan} "
          f"compile {args.compile}: 3 steps")
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    for what in ("selective scan", "conv"):
        time = sum(e.self_device_time_total for e in kernels if _kernel_of(e.key) == what)
        print(f"{what} kernels: {time / 1e3:.1f} ms of {total / 1e3:.1f} ms of GPU time over 3 steps "
              f"({100 * time / max(total, 1):.0f}%)")


def _kernel_of(name):
    """'selective scan', 'conv' (the mixer's depthwise conv + SiLU) or None, from a GPU kernel's name: our Triton
    kernels by their exact names, mamba-ssm's and causal-conv1d's by theirs. torch.compile's own kernels (triton_*)
    are neither, even where their names quote a custom op they feed."""
    if name.startswith("triton_"):
        return None
    if name in ("_fwd_kernel", "_bwd_kernel") or "selective_scan_fwd_kernel" in name or \
            "selective_scan_bwd_kernel" in name:
        return "selective scan"
    if name in ("_conv_fwd_kernel", "_conv_bwd_kernel") or "causal_conv1d" in name:
        return "conv"
    return None


if __name__ == "__main__":
    main()
