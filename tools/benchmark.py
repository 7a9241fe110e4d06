#!/usr/bin/env python3
"""Training-step throughput and memory: Vision Mamba variants against a compiled timm ViT of the same shape.

Each row times the real training step (on-device augmentation with RandAugment, Mixup/CutMix, forward,
backward, fused AdamW; bf16 autocast on CUDA) on synthetic uint8 images, with CUDA events around the timed
steps only. Prints a table and writes JSON.

    python tools/benchmark.py --archs mamba_tiny mamba_small --batch_sizes 128 1024 --json bench.json
    python tools/benchmark.py --cpu_smoke        # a tiny CPU run, so that the tool cannot rot
    python tools/benchmark.py --stem_only --archs mamba_small --batch_sizes 512   # the tokenizer alone
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.bimamba import use_causal_conv1d  # noqa: E402
from models.scan import SCAN_CHOICES, resolve_scan  # noqa: E402
from models.vim import VARIANTS, ConvStem, build_model, vim_config  # noqa: E402
from training.config import DEFAULT_PATCH_SIZE  # noqa: E402
from training.data import MEAN_STD  # noqa: E402
from training.engine import set_backend_flags  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.step import TrainStep  # noqa: E402


def build_vit(width, depth, patch_size, num_classes):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=patch_size, embed_dim=width, depth=depth,
                             num_heads=max(1, width // 64), num_classes=num_classes, drop_path_rate=0.1)


def time_steps(model, device, batch_size, steps, warmup, amp, compile_model, randaugment=True, compile_mode=None):
    """-> (images/s, peak memory in GiB or None). Synthetic uint8 CIFAR-shaped data already on the device.
    compile_mode: torch.compile's mode for the model ("reduce-overhead": CUDA graphs).
    The peak covers the warmup steps too: CUDA graphs take their memory when they are recorded (in the warmup), and
    replaying them allocates nothing, so a peak of the timed steps alone would leave their activations out."""
    opt = build_optimizer(model, 1e-3, 0.05, device)
    mean, std = MEAN_STD["cifar10"]
    train_model = torch.compile(model, mode=compile_mode) if compile_model else model
    step = TrainStep(model, opt, num_classes=10, mean=mean, std=std, use_randaugment=randaugment, amp=amp,
                     train_model=train_model, cuda_graphs=compile_model and compile_mode == "reduce-overhead")
    g = torch.Generator(device="cpu").manual_seed(0)
    data = [(torch.randint(0, 256, (batch_size, 3, 32, 32), generator=g, dtype=torch.uint8).to(device),
             torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(4)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step([data[i % 4]], 1e-3)
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(steps):
        step([data[i % 4]], 1e-3)
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return batch_size * steps / seconds, peak


def run_row(kind, arch, width, depth, patch, batch, args, device):
    torch.manual_seed(0)
    amp = device.type == "cuda"
    # with the conv stem, the patch size is the stem's stride: the Vision Mamba and its ViT get the same tokens
    row = dict(model=kind, arch=arch, width=width, depth=depth, patch_size=patch, tokens=(32 // patch) ** 2 + 1,
               batch_size=batch)
    try:
        if kind == "vit":
            model = build_vit(width, depth, patch, 10).to(device)
            row.update(scan=None, compiled=True)
            ips, peak = time_steps(model, device, batch, args.steps, args.warmup, amp, compile_model=True)
        else:
            model = build_model(arch, 10, embed_dim=width, depth=depth, patch_size=patch, stem=args.stem).to(device)
            scan = resolve_scan(args.scan, device)
            conv = use_causal_conv1d(scan, args.compile)
            model.set_kernels(scan, conv)
            row.update(scan=scan, causal_conv1d=conv, compiled=args.compile, stem=args.stem,
                       compile_mode=args.compile_mode if args.compile else None)
            ips, peak = time_steps(model, device, batch, args.steps, args.warmup, amp, compile_model=args.compile,
                                   compile_mode=args.compile_mode)
        row.update(images_per_s=round(ips, 1), peak_mem_gib=None if peak is None else round(peak, 2))
    except torch.cuda.OutOfMemoryError:
        row.update(images_per_s=None, peak_mem_gib="OOM")
    except Exception as e:  # one failing configuration (e.g. a compile error) must not hide the others
        row.update(images_per_s=None, peak_mem_gib=None, error=f"{type(e).__name__}: {str(e)[:300]}")
        print(f"  {kind} {arch} batch {batch} patch {patch} failed: {row['error']}", flush=True)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _scan_inputs(batch, length, dim, state, device="cuda"):
    """bf16 (B, L, D)-stored activations as (B, D, L) views, like the model's; fp32 parameters; all need gradients,
    as in training."""
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    u, dt, z = (r(batch, length, dim).bfloat16().transpose(1, 2).requires_grad_() for _ in range(3))
    A = (-torch.rand(dim, state, device=device, generator=g) - 0.5).requires_grad_()
    D, bias = r(dim).requires_grad_(), (r(dim) * 0.1).requires_grad_()
    B, C = (r(batch, length, state).bfloat16().transpose(1, 2).requires_grad_() for _ in range(2))
    return u, dt, A, B, C, D, z, bias


def _cuda_ms(fn, reps, warmup=3, cuda=True):
    """Milliseconds per call of fn: CUDA events around the timed calls, or the wall clock with cuda=False (CPU)."""
    for _ in range(warmup):
        fn()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1000
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _time_scan(fn, inputs, reps, cuda=True):
    """-> (forward ms, forward+backward ms) of both directions (the second a reverse scan, as in the model). The
    backward gets a fixed output gradient laid out like the output and hands back every input's gradient without
    accumulating it anywhere, so what is timed is the scan's own backward (its kernels and the reductions after
    them), not autograd's work around it (an fp32 copy and sum of the output, gradients added into .grad)."""
    u, dt, A, B, C, D, z, bias = inputs

    def fwd():
        return [fn(u, dt, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, reverse=rev) for rev in (False, True)]

    with torch.no_grad():
        grads_out = [torch.randn_like(o) for o in fwd()]

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, grad_outputs=grads_out)

    with torch.no_grad():
        ms_fwd = _cuda_ms(fwd, reps, cuda=cuda)
    return ms_fwd, _cuda_ms(fwd_bwd, reps, cuda=cuda)


def stem_bench(archs, batch_sizes, device, reps=50, warmup=10, compile_too=True):
    """The tokenizer alone, forward and backward (bf16 autocast on CUDA): Vim's patch embedding against the conv stem,
    NCHW against channels-last, eager and compiled -> rows with milliseconds per batch. What the stem costs in a
    step, without the 24 layers around it."""
    cuda = device.type == "cuda"
    rows = []
    for arch in archs:
        for batch in batch_sizes:
            for stem in ("patch", "conv"):
                for channels_last in (False, True):
                    for compiled in (False, True) if compile_too else (False,):
                        torch._dynamo.reset()
                        fmt = torch.channels_last if channels_last else torch.contiguous_format
                        embed = build_model(arch, 10, stem=stem).patch_embed.to(device, memory_format=fmt)
                        fn = torch.compile(embed) if compiled else embed
                        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)

                        def fwd_bwd():
                            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                                y = fn(x)
                            y.float().square().mean().backward()

                        ms = _cuda_ms(fwd_bwd, reps, warmup, cuda)
                        rows.append(dict(arch=arch, batch_size=batch, stem=stem, channels_last=channels_last,
                                         compiled=compiled, ms=round(ms, 3)))
                        print(f"{arch:<12} {batch:>5} {stem:<5} {'channels_last' if channels_last else 'NCHW':<13} "
                              f"{'compiled' if compiled else 'eager':<8} {ms:8.3f} ms", flush=True)
    return rows


def scan_floors(batch, length, dim, state, sms, clock_hz, bytes_per_s):
    """Lower bounds on one scan call (one direction, bf16 activations) -> dict of milliseconds:
    exp_ms: one exponential exp(delta*A) per (batch, channel, step, state), at 16 per clock per SM (the special-function
            units' rate on sm_80/sm_90); any forward computes each once, and any backward at least once more;
    fwd_mem_ms: u, delta, z read and the output written once (B, L, D bf16 each), B and C read once;
    bwd_mem_ms: u, delta, z, dout read and du, ddelta, dz written once, B and C read, dB and dC (fp32) written."""
    act, bc = batch * length * dim * 2, batch * length * state * 2
    return dict(exp_ms=batch * dim * length * state / (16 * sms * clock_hz) * 1e3,
                fwd_mem_ms=(4 * act + 2 * bc) / bytes_per_s * 1e3,
                bwd_mem_ms=(7 * act + 2 * bc + 4 * bc) / bytes_per_s * 1e3)


def device_ceilings():
    """-> (SMs, max SM clock in Hz, copy bandwidth in bytes/s) of this GPU: the clock from NVML (the current clock when
    NVML is missing), the bandwidth measured by a device-to-device copy of 2 GiB (bytes read plus written)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1e6
    except Exception:
        clock = torch.cuda.clock_rate() * 1e6
    src = torch.empty(2**30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src), reps=10)
    return sms, clock, 2 * src.numel() * 2 / (ms / 1e3)


def _backends(backends, chunks):
    """-> [(label, scan function, chunk)]: each backend, and the triton backend once per chunk length when given."""
    from models.scan import get_scan_fn
    out = []
    for backend in backends:
        for chunk in (chunks or [None]) if backend == "triton" else [None]:
            out.append((backend if chunk is None else f"triton/{chunk}", get_scan_fn(backend), chunk))
    return out


def scan_bench(backends, batch_sizes, dim=768, state=16, lengths=(65, 257), reps=20, chunks=None):
    """The selective scan alone, both directions, bf16 inputs like training's, each call's time beside its floors
    (``scan_floors``); chunks: backward chunk lengths to time the triton backend at (models/scan_triton.py's CHUNK).
    -> rows of dict(backend, batch, length, dim, fwd_ms, ms, bwd_ms, floors) where ms is forward+backward of both
    directions."""
    import models.scan_triton as st
    sms, clock, bandwidth = device_ceilings()
    print(f"ceilings: {sms} SMs at {clock / 1e9:.2f} GHz (exp: {16 * sms * clock / 1e12:.2f} T/s), "
          f"copy {bandwidth / 1e12:.2f} TB/s (read + written)")
    rows = []
    for length in lengths:
        for batch in batch_sizes:
            inputs = _scan_inputs(batch, length, dim, state)
            floors = scan_floors(batch, length, dim, state, sms, clock, bandwidth)
            for backend, fn, chunk in _backends(backends, chunks):
                saved = st.CHUNK
                st.CHUNK = chunk or saved
                try:
                    ms_fwd, ms = _time_scan(fn, inputs, reps)
                except Exception as e:
                    ms_fwd = ms = None
                    traceback.print_exc()
                    print(f"  scan {backend} failed: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    st.CHUNK = saved
                row = dict(backend=backend, batch=batch, length=length, dim=dim, fwd_ms=ms_fwd, ms=ms,
                           bwd_ms=None if ms is None else ms - ms_fwd, floors=floors)
                rows.append(row)
                if ms is None:
                    continue
                fwd, bwd = ms_fwd / 2, row["bwd_ms"] / 2  # per call (one direction)
                fwd_floor = max(floors["exp_ms"], floors["fwd_mem_ms"])
                bwd_floor = max(floors["exp_ms"], floors["bwd_mem_ms"])
                print(f"scan {backend:<9} batch {batch:>5} L {length:>4} D {dim}: per call forward {fwd:.3f} ms "
                      f"({fwd / fwd_floor:.1f}x its floor {fwd_floor:.3f}), backward {bwd:.3f} ms "
                      f"({bwd / bwd_floor:.1f}x its floor {bwd_floor:.3f}); floors: exp {floors['exp_ms']:.3f}, "
                      f"memory {floors['fwd_mem_ms']:.3f} / {floors['bwd_mem_ms']:.3f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # None: a default that depends on the mode (GPU rows, or --cpu_smoke's tiny run); see below
    p.add_argument("--archs", nargs="+", default=None, choices=list(VARIANTS),
                   help="default mamba_tiny mamba_small (--cpu_smoke: mamba_tiny at width 16)")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=None, help="default 128 1024 (--cpu_smoke: 8)")
    p.add_argument("--patch_sizes", nargs="+", type=int, default=None,
                   help="patch sizes; with --stem conv, the stem's strides (2 or 4). Default as in training: 2 with "
                        "the conv stem, 4 with patches")
    p.add_argument("--depth", type=int, default=None, help="override the variants' depth (--cpu_smoke: 2)")
    p.add_argument("--stem", default="conv", choices=("patch", "conv"),
                   help="the Vision Mamba's tokenizer (default conv, as training from scratch)")
    p.add_argument("--scan", default="auto", choices=SCAN_CHOICES)
    p.add_argument("--compile", action="store_true", help="torch.compile the Vision Mamba too")
    p.add_argument("--compile_mode", default=None, choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode for the Vision Mamba (reduce-overhead: CUDA graphs)")
    p.add_argument("--no_vit", action="store_true", help="skip the ViT comparison")
    p.add_argument("--no_cudnn_benchmark", action="store_true",
                   help="leave cuDNN's autotuner off (training turns it on unless --deterministic), for an A/B")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row, default 20 (--cpu_smoke: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, default 5 (--cpu_smoke: 1)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--cpu_smoke", action="store_true",
                   help="a tiny run on the CPU (CI), without the ViT; the flags above still apply where given")
    p.add_argument("--scan_only", nargs="*", default=None, metavar="BACKEND",
                   help="time only the selective scan (fwd+bwd, both directions, D=768) for these backends")
    p.add_argument("--stem_only", action="store_true",
                   help="time only the tokenizer (patch and conv stem, NCHW and channels-last, eager and compiled; "
                        "forward+backward) at --archs' width and --batch_sizes")
    p.add_argument("--scan_lengths", nargs="+", type=int, default=None, metavar="TOKENS",
                   help="sequence lengths for --scan_only (default 65 257: the two tokenizers' counts)")
    p.add_argument("--chunks", nargs="+", type=int, default=None, metavar="STEPS",
                   help="with --scan_only: time the triton backend at each of these backward chunk lengths")
    args = p.parse_args(argv)
    given_arch = args.archs is not None
    if not given_arch:
        args.archs = ["mamba_tiny"] if args.cpu_smoke else ["mamba_tiny", "mamba_small"]
    args.batch_sizes = args.batch_sizes or ([8] if args.cpu_smoke else [128, 1024])
    args.steps = (2 if args.cpu_smoke else 20) if args.steps is None else args.steps
    args.warmup = (1 if args.cpu_smoke else 5) if args.warmup is None else args.warmup
    args.compile = args.compile or args.compile_mode is not None
    in_range = {"--batch_sizes": min(args.batch_sizes) >= 1, "--steps": args.steps >= 1, "--warmup": args.warmup >= 0,
                "--depth": args.depth is None or args.depth >= 1}
    if not all(in_range.values()):
        print(f"benchmark.py: error: {', '.join(k for k, ok in in_range.items() if not ok)} out of range (batch "
              f"sizes, steps and depth at least 1, warmup at least 0)", file=sys.stderr)
        return 2
    set_backend_flags(deterministic=False)  # as training sets them
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    for name in ("scan_lengths", "chunks"):
        if getattr(args, name) is not None and min(getattr(args, name)) < 1:
            print(f"benchmark.py: error: --{name} must be positive, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.scan_only is not None:
        if not torch.cuda.is_available():
            print("benchmark.py: error: --scan_only needs a CUDA GPU", file=sys.stderr)
            return 2
        lengths = {} if args.scan_lengths is None else {"lengths": tuple(args.scan_lengths)}
        rows = scan_bench(args.scan_only or ["cuda", "triton"], args.batch_sizes, chunks=args.chunks, **lengths)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": {"device": torch.cuda.get_device_name()}, "scan_rows": rows}, f, indent=1)
        return 0
    if not (args.cpu_smoke or torch.cuda.is_available()):
        print("benchmark.py: error: no CUDA GPU; use --cpu_smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.stem_only:
        if args.cpu_smoke:  # one pass of each eager tokenizer on a tiny batch
            rows = stem_bench(args.archs, args.batch_sizes, device, reps=1, warmup=1, compile_too=False)
        else:
            rows = stem_bench(args.archs, args.batch_sizes, device)
        if args.json:
            meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        torch=torch.__version__, cudnn_benchmark=torch.backends.cudnn.benchmark)
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "stem_rows": rows}, f, indent=1)
        return 0
    explicit_patch = args.patch_sizes is not None
    if not explicit_patch:
        args.patch_sizes = [DEFAULT_PATCH_SIZE[args.stem]]  # as training
    if args.stem == "conv" and not set(args.patch_sizes) <= set(ConvStem.STRIDES):
        print(f"benchmark.py: error: --stem conv takes --patch_sizes 2 or 4 (its stride), got {args.patch_sizes}",
              file=sys.stderr)
        return 2
    try:
        resolve_scan(args.scan, device)
    except ValueError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        args.no_vit = True  # a compiled ViT would take the CPU minutes to build
        if args.stem == "patch" and not explicit_patch:  # fewer tokens for the CPU; the conv stem keeps its stride
            args.patch_sizes = [8]
    if args.cpu_smoke and not given_arch:
        shapes = [("mamba_tiny", 16, args.depth or 2)]
    else:
        shapes = [(a, vim_config(a).embed_dim, args.depth or vim_config(a).depth) for a in args.archs]
    rows = []
    header = f"{'model':<6} {'arch':<12} {'width':>5} {'depth':>5} {'tokens':>6} {'batch':>5} {'scan':<7} " \
             f"{'img/s':>9} {'peak GiB':>8} {'vs ViT':>6}"
    print(header)
    for arch, width, depth in shapes:
        for patch in args.patch_sizes:
            for batch in args.batch_sizes:
                vim = run_row("vim", arch, width, depth, patch, batch, args, device)
                vit = None if args.no_vit else run_row("vit", arch, width, depth, patch, batch, args, device)
                if vit and vim["images_per_s"] and vit["images_per_s"]:
                    vim["ratio_to_vit"] = round(vim["images_per_s"] / vit["images_per_s"], 3)
                for r in (vim, vit):
                    if r is None:
                        continue
                    rows.append(r)
                    ips = f"{r['images_per_s']:,.0f}" if r["images_per_s"] else "-"
                    mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "-"
                    ratio = f"{r['ratio_to_vit']:.2f}" if "ratio_to_vit" in r else ""
                    print(f"{r['model']:<6} {arch:<12} {width:>5} {depth:>5} {r['tokens']:>6} {batch:>5} "
                          f"{str(r.get('scan') or 'attn'):<7} {ips:>9} {str(mem):>8} {ratio:>6}", flush=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                steps=args.steps, warmup=args.warmup, compile_vim=args.compile,
                cudnn_benchmark=torch.backends.cudnn.benchmark)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
