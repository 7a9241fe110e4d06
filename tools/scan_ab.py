#!/usr/bin/env python3
"""A/B of selective-scan kernel files in one run: each call's forward and backward time, and how far each file's
outputs and gradients are from the first file's.

A kernel file is models/scan_triton.py or an older or edited copy of it (for example `git show REV:models/scan_triton.py
> /tmp/old.py`); its launch functions (`_forward`, `_backward`) are timed directly, so copies never clash. FILE:NAME=N
sets a module constant after loading (CHUNK, GROUP), to time a setting without editing the file.

    python tools/scan_ab.py /tmp/old.py models/scan_triton.py models/scan_triton.py:CHUNK=2 --json ab.json

Inputs are the model's: mamba_small's 768 channels, 16 states, bf16 activations stored (B, L, D) and seen as (B, D, L),
B and C slices of one (B, L, 56) projection, fp32 A, D and delta_bias, softplus and the z gate on; both directions
are timed apart. Times are CUDA events around 20 calls after 3 warm-up calls. Needs a GPU. A kernel that fails gets a
row with its error and the rest still run; at the end a summary gives each kernel's times as the mean of the two
directions, and forward plus backward against the first kernel's.
"""
import argparse
import json
import os
import re
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.benchmark import _cuda_ms  # noqa: E402


class Refused(Exception):
    pass


def load(spec):
    """'path[:NAME=int,...]' -> module with the file's kernels and launch functions. The file's torch.library
    registrations (from ``def _device`` or the first ``... = scan_op(``) are left out: two copies would register the
    same op names."""
    path, _, settings = spec.partition(":")
    try:
        src = open(path).read()
    except OSError as e:
        raise Refused(f"cannot read {path}: {e.strerror}")
    end = re.search(r"^(def _device\(|\w+ = scan_op\()", src, re.M)
    if end is None or "def _forward(" not in src or "def _backward(" not in src:
        raise Refused(f"{path} is not a scan kernel file (no _forward, _backward and op registration)")
    module = types.ModuleType(os.path.splitext(os.path.basename(path))[0])
    module.__file__ = os.path.abspath(path)
    exec(compile(src[:end.start()], path, "exec"), module.__dict__)
    for item in filter(None, settings.split(",")):
        name, eq, value = item.partition("=")
        if not eq or not hasattr(module, name) or not value.lstrip("-").isdigit():
            raise Refused(f"{spec}: settings are NAME=integer for constants the file defines, got {item!r}")
        setattr(module, name, int(value))
    return module


def inputs(batch, length, dim=768, state=16, dt_rank=24, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    u, dt, z, dout = (r(batch, length, dim).bfloat16().transpose(1, 2) for _ in range(4))
    dt = (dt.float() * 0.5 - 1.0).bfloat16()
    x_dbl = r(batch, length, dt_rank + 2 * state).bfloat16()
    B, C = (x_dbl[..., dt_rank + i * state:dt_rank + (i + 1) * state].transpose(1, 2) for i in range(2))
    A = -(torch.rand(dim, state, device=device, generator=g) * 15 + 1)
    return u, dt, A, B, C, r(dim), z, r(dim) * 0.1, dout


def compare(kernels, shapes):
    """kernels: [(label, module)]; shapes: [(length, batch)] -> rows, printed as they come. A kernel that fails
    (a compile error, say) gets a row with its error, and the others still run."""
    rows = []
    for length, batch in shapes:
        u, dt, A, B, C, D, z, bias, dout = inputs(batch, length)
        first = {}
        for label, m in kernels:
            for reverse in (False, True):
                def fwd():
                    return m._forward(u, dt, A, B, C, D, z, bias, True, reverse)

                def bwd():
                    return m._backward(dout, u, dt, A, B, C, D, z, bias, True, reverse)
                try:
                    results = [fwd()] + [g for g in bwd() if g is not None]
                except Exception as e:  # noqa: BLE001 (one line, and on to the next kernel)
                    message = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    rows.append(dict(kernel=label, length=length, batch=batch, reverse=reverse, error=message))
                    print(f"{label:<40} L {length:>4} batch {batch:>5} failed: {message}", flush=True)
                    continue
                err = None
                if reverse in first:  # largest difference over outputs and gradients, relative to the tensor's max
                    err = max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                              for x, y in zip(results, first[reverse]))
                else:
                    first[reverse] = results
                row = dict(kernel=label, length=length, batch=batch, reverse=reverse,
                           fwd_ms=round(_cuda_ms(fwd, 20), 4), bwd_ms=round(_cuda_ms(bwd, 20), 4),
                           max_rel_diff_vs_first=err)
                rows.append(row)
                print(f"{label:<40} L {length:>4} batch {batch:>5} {'reverse' if reverse else 'forward':<8} "
                      f"forward {row['fwd_ms']:.3f} ms  backward {row['bwd_ms']:.3f} ms"
                      + ("" if err is None else f"  max rel. diff {err:.1e}"), flush=True)
    return rows


def summary(rows):
    """-> lines: per shape and kernel, forward and backward ms as the mean of the two directions, and forward plus
    backward against the first kernel's."""
    lines = [f"{'kernel':<40} {'L':>4} {'batch':>5}  fwd ms  bwd ms  fwd+bwd vs first"]
    base = {}
    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["length"], r["batch"], r["kernel"]), []).append(r)
    for (length, batch, label), rs in groups.items():
        f = sum(r["fwd_ms"] for r in rs) / len(rs)
        b = sum(r["bwd_ms"] for r in rs) / len(rs)
        ref = base.setdefault((length, batch), f + b)
        lines.append(f"{label:<40} {length:>4} {batch:>5}  {f:6.3f}  {b:6.3f}  {(f + b) / ref:.3f}x")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="+", metavar="FILE[:NAME=N,...]")
    p.add_argument("--shapes", nargs="+", default=["65x128", "65x512", "257x128", "257x512"], metavar="LxB",
                   help="sequence length x batch (default: both tokenizers' lengths at batch 128 and 512)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    try:
        shapes = []
        for s in args.shapes:
            length, x, batch = s.partition("x")
            if not (x and length.isdigit() and batch.isdigit() and int(length) > 0 and int(batch) > 0):
                raise Refused(f"--shapes takes LENGTHxBATCH with positive integers, got {s!r}")
            shapes.append((int(length), int(batch)))
        kernels = [(spec, load(spec)) for spec in args.kernels]
        if not torch.cuda.is_available():
            raise Refused("needs a CUDA GPU")
    except Refused as e:
        print(f"scan_ab.py: error: {e}", file=sys.stderr)
        return 2
    rows = compare(kernels, shapes)
    print("\n".join(["", "mean of the two directions:"] + summary(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
