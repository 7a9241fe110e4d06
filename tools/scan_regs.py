#!/usr/bin/env python3
"""Registers and spills of the Triton scan kernels, compiled for a GPU architecture on any machine (no GPU needed).

The backward keeps a chunk of states in registers, so its chunk length decides registers per thread, and so how many
warps an SM holds; spills slow it down. This shows both without a GPU, before a GPU times the chunk lengths
(benchmark.py --scan_only triton --chunks ...).

    python tools/scan_regs.py                        # the forward and the backward as configured, for sm_90
    python tools/scan_regs.py --chunks 1 2 3 4 --arch 80

Per kernel: registers per thread and stack bytes per thread (spilled registers live there), as ptxas allocates them,
and the machine instructions in each loop over the sequence (from nvdisasm's SASS; per step: the loop's count divided
by the steps one iteration takes, GROUP in the forward and the chunk length in each of the backward's two passes, a
kernel each): with the latency of the loads, what bounds the scan (docs/SPEED.md). All for the model's case (bf16
activations, fp32 parameters, 16 states, D, z, delta_bias and softplus on, forward scan); pass 2 twice, the second as
the scan pair's second backward runs it (adding its dz to the one stored, DZ_ADD).
Numbers belong to the installed Triton and ptxas: another Triton version may allocate differently.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model's case: mamba_small's inner width, 65 tokens, 16 states, dt_rank 24; bf16 activations as the mixer passes
# them, (B, L, *) tensors seen as (B, *, L) views; fp32 A, D, delta_bias; z, softplus, forward scan. The batch size
# changes no stride that matters here (only the batch stride, which is a multiple of 16 either way).
MODEL_CASE = dict(batch=2, dim=768, length=65, state=16, dt_rank=24)


def model_case(kind):
    """-> (grid, arguments, constants) of the launch that models/scan_triton.py makes for the model's case (the same
    code builds them, so the compiled kernel is the one a GPU would run). kind: "fwd", or the backward's "pass1"
    (the chunk states), "pass2" (the gradients) or "pass2_dz_add" (pass 2 adding dz into the buffer, as the scan
    pair's second backward runs it)."""
    import torch
    import models.scan_triton as st
    b, d, length, n, r = (MODEL_CASE[k] for k in ("batch", "dim", "length", "state", "dt_rank"))
    act = lambda: torch.empty(b, length, d, dtype=torch.bfloat16).transpose(1, 2)  # noqa: E731
    x_dbl = torch.empty(b, length, r + 2 * n, dtype=torch.bfloat16)
    B, C = x_dbl[..., r:r + n].transpose(1, 2), x_dbl[..., r + n:].transpose(1, 2)
    u, dt, z = act(), act(), act()
    A, D, bias = torch.empty(d, n), torch.empty(d), torch.empty(d)
    if kind == "fwd":
        grid, args, meta, _ = st._forward_launch(u, dt, A, B, C, D, z, bias, True, False)
    else:  # pass2_dz_add: pass 2 adding its dz to the one already in the buffer (the scan pair's second backward)
        dz_out = act() if kind == "pass2_dz_add" else None
        grid, args, meta, _ = st._backward_launch(act(), u, dt, A, B, C, D, z, bias, True, False, dz_out=dz_out)
        meta = dict(meta, PASS={"pass1": 1, "pass2": 2, "pass2_dz_add": 2}[kind])
    return grid, args, meta


def compile_kernel(kind, arch):
    """-> the compiled kernel (model_case's kind, at models/scan_triton.py's CHUNK) for sm_<arch>, specialised as
    Triton's launcher specialises the real call: integer arguments equal to 1 (unit strides) become constants, and
    pointers and integers divisible by 16 are marked so (what lets loads be vectorised)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    import models.scan_triton as st
    jit_fn = st._fwd_kernel if kind == "fwd" else st._bwd_kernel
    _, args, meta = model_case(kind)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jit_fn.arg_names):
        if name in meta:
            signature[name], constexprs[(i,)] = "constexpr", meta[name]
            continue
        kind_, spec = native_specialize_impl(CUDABackend, args[i], False, True, True)
        signature[name] = kind_
        if kind_ == "constexpr":
            constexprs[(i,)] = args[i]
        elif isinstance(spec, str):  # (a float argument has no specialisation)
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    source = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=meta["num_warps"]))


def _cubin_tool(compiled, tool, *flags):
    """-> the stdout of one of the CUDA tools that ship with Triton (cuobjdump, nvdisasm) run on the kernel's cubin."""
    import triton
    path_to_tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([path_to_tool, *flags, path], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled):
    """-> (registers, stack bytes) per thread, read from the cubin by cuobjdump."""
    out = _cubin_tool(compiled, "cuobjdump", "-res-usage")
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not match:
        raise RuntimeError(f"no register count in cuobjdump's output: {out.strip()[:200]}")
    return int(match.group(1)), int(match.group(2))


def loops(compiled):
    """-> [(instructions, {opcode: count})] of each outermost loop in the kernel's SASS, in program order (a loop: the
    instructions from a label to a branch back to it)."""
    labels, instrs = {}, []
    for line in _cubin_tool(compiled, "nvdisasm", "-c").splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            text = re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip())
            instrs.append(text)
    spans = []
    for i, text in enumerate(instrs):
        m = re.match(r"BRA\S*\s+`?\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), i) < i:  # (a branch to itself is the end-of-kernel trap, not a loop)
            start = labels[m.group(1)]
            spans = [sp for sp in spans if not start <= sp[0]] + [(start, i)]
    return [(end - start + 1, dict(collections.Counter(t.split()[0].split(".")[0] for t in instrs[start:end + 1])))
            for start, end in spans]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as a number: 90 (H100/H200), 80 (A100)")
    p.add_argument("--chunks", nargs="+", type=int, default=None, metavar="STEPS",
                   help="backward chunk lengths to compile (default: models/scan_triton.py's CHUNK)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        print("scan_regs.py: error: Triton with its NVIDIA backend is not installed", file=sys.stderr)
        return 2
    if args.chunks is not None and min(args.chunks) < 1:
        print(f"scan_regs.py: error: --chunks must be positive, got {args.chunks}", file=sys.stderr)
        return 2
    import models.scan_triton as st
    saved = st.CHUNK
    shapes = [("fwd", None)] + [(kind, c) for c in (args.chunks or [saved])
                                for kind in ("pass1", "pass2", "pass2_dz_add")]
    rows = []
    try:
        for kind, chunk in shapes:
            st.CHUNK = chunk or saved
            try:
                compiled = compile_kernel(kind, args.arch)
                regs, stack = resource_usage(compiled)
                sizes = [n for n, _ in loops(compiled)]
            except Exception as e:  # one line, not a traceback: the Triton API moves between versions
                print(f"scan_regs.py: error: compiling the {kind} kernel for sm_{args.arch} failed: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", file=sys.stderr)
                return 1
            steps = st.GROUP if kind == "fwd" else (chunk or saved)  # steps an iteration
            rows.append(dict(kernel=kind, chunk=chunk, arch=args.arch, regs=regs, stack_bytes=stack,
                             loop_instructions=sizes, instructions_per_step=round(sum(sizes) / steps, 1)))
            label = {"fwd": "forward", "pass1": f"backward pass 1, chunk {chunk or saved}",
                     "pass2": f"backward pass 2, chunk {chunk or saved}",
                     "pass2_dz_add": f"pass 2 adding dz, chunk {chunk or saved}"}[kind]
            print(f"{label:<27} sm_{args.arch}  regs {regs:>3}  stack {stack:>5} bytes  loop instructions "
                  f"{'+'.join(map(str, sizes))} = {sum(sizes) / steps:.0f} a step", flush=True)
    finally:
        st.CHUNK = saved
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
