"""Compile every MoE Triton kernel, and the decode-attention kernels of the ``mma`` variant, for an sm_90 GPU, with the argument types its host code
launches it with, on a machine without a GPU (run by ``test_kernels_compile.py`` in a process
without ``TRITON_INTERPRET``).

Triton's CPU interpreter, which runs the kernel tests, executes a kernel's Python body and checks
no types: a kernel can pass every interpreted test and still fail to compile (for instance the
branches of a ``constexpr`` ``if`` returning different integer widths). Here the host functions
run with CPU tensors and a recording ``launch`` (nothing executes), and each recorded launch is
compiled through Triton's front end, LLVM and ``ptxas`` to a cubin.
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from xquant_fx.kernels import attend, moe

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 232448  # per block, opt-in maximum of H100 / H200
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")


class _Recorder:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record(launches: list):
    return lambda kernel: _Recorder(kernel, launches)


def compile_launch(kernel, args, kwargs) -> None:
    """Compile one recorded launch as the launcher would: the same specialization of each
    argument (constants for integers equal to 1, 16-byte divisibility of pointers and integers,
    which decides whether Triton vectorizes and pipelines the loads; the recorded CPU tensors are
    whole allocations, aligned as device ones are)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    params = kernel.params
    values = dict(zip([p.name for p in params], args))
    values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for p in params:
        value = values[p.name]
        if p.is_constexpr or value is None:  # Triton specializes a None argument as a constant
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, p.is_const, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = value
        elif attr:
            attrs[(p.num,)] = CUDABackend.parse_attr(attr)
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET,
                              options=options)
    # the launch-time check the interpreter never makes (Triton raises OutOfResources on the GPU)
    assert compiled.metadata.shared <= SM90_SHARED_BYTES, (
        f"{kernel.__name__} {constexprs}: {compiled.metadata.shared} bytes of shared memory, sm_90 has {SM90_SHARED_BYTES}")
    regs, spills = _ptxas_resources(compiled.asm["ptx"])
    # An attention kernel that spills runs its loop from local memory: fail here, not on the device.
    # The exception, measured: the mma launch with the tail's programs (one warp runs a tail
    # block; its tiles spill, ~560 bytes), which the host code takes at small capacities only.
    fused_tail = constexprs.get("TAIL_PROGRAMS", False)
    assert spills <= 64 or fused_tail or not kernel.__name__.startswith("_attend"), (
        f"{kernel.__name__} {constexprs}: {spills} bytes spilled")
    return regs, spills


def inductor_copy(kernel):
    """``kernel`` as ``torch.compile`` / AOTInductor compile it: Inductor writes a user-defined
    Triton kernel into its own module with the jit functions it reaches through plain global
    names, so a call through a module attribute (``module.fn(...)``) does not resolve there."""
    import importlib.util
    import tempfile

    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    folder = tempfile.mkdtemp()
    path = f"{folder}/inductor_{kernel.__name__}.py"
    with open(path, "w") as fh:  # Inductor's header, and the decorator it adds to the kernel
        fh.write("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + source)
    spec = importlib.util.spec_from_file_location(f"inductor_{kernel.__name__}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.__name__)


def _ptxas_resources(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) that Triton's ``ptxas`` reports for ``ptx``."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas()
    except TypeError:  # newer Triton: per architecture
        ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as fh:
            fh.write(ptx)
        done = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", f"{tmp}/k.cubin"], capture_output=True,
                              text=True, check=True)
    report = done.stdout + done.stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return regs, spills


def scenarios():
    """Host calls covering every kernel and constexpr branch: MoE decode (slot blocks, both
    projections split) and block-table steps, router top-k in bf16 and float32, with and without
    pruned slots, and whole softmax routers (bf16 or float32 logits, normalized, cast values)."""
    bf16 = torch.bfloat16
    e, hid, inter = 16, 512, 256
    gate_up, down = torch.zeros(e, 2 * inter, hid, dtype=bf16), torch.zeros(e, hid, inter, dtype=bf16)
    for tokens, k in ((1, 8), (16, 4)):
        x = torch.zeros(tokens, hid, dtype=bf16)
        ids = torch.zeros(tokens, k, dtype=torch.int64)
        yield f"moe_experts {tokens}x{k}", lambda x=x, ids=ids: moe.moe_experts(
            x, ids, torch.zeros(ids.shape, dtype=bf16), gate_up, down)
    for tokens, keep in ((1, 4), (2, 6), (4, 6)):  # kept slots read in place (K_TOP < K_ROW): slot blocks, table
        x = torch.zeros(tokens, hid, dtype=bf16)
        ids = torch.zeros(tokens, 8, dtype=torch.int64)
        yield f"moe_experts {tokens}x8 keep {keep}", lambda x=x, ids=ids, keep=keep: moe.moe_experts(
            x, ids, torch.zeros(ids.shape, dtype=bf16), gate_up, down, keep)
    e, hid, inter = 16, 1024, 256  # batch 1, k=2: the up projection split 8 ways
    gate_up, down = torch.zeros(e, 2 * inter, hid, dtype=bf16), torch.zeros(e, hid, inter, dtype=bf16)
    yield "moe_experts 1x2", lambda: moe.moe_experts(torch.zeros(1, hid, dtype=bf16), torch.zeros(1, 2, dtype=torch.int64),
                                                     torch.zeros(1, 2, dtype=bf16), gate_up, down)
    yield "router_topk bf16", lambda: moe.topk(torch.zeros(3, 128, dtype=bf16), 8)
    yield "router_topk fp32", lambda: moe.topk(torch.zeros(5, 64), 6)
    yield "router_topk, pruned", lambda: moe.topk(torch.zeros(2, 128, dtype=bf16), 8, 3, float("-inf"), 128)
    w = torch.zeros(128, hid, dtype=bf16)
    yield "router bf16, normalized", lambda: moe.router(torch.zeros(1, hid, dtype=bf16), w, 8, 4, 0.0, 128, True,
                                                         bf16, bf16)
    yield "router fp32 logits", lambda: moe.router(torch.zeros(3, hid, dtype=bf16), w, 6, 6, 0.0, 128, False,
                                                    torch.float32, torch.float32)


def attend_scenarios():
    """The ``mma`` variant of decode attention (stage 1 on raw codes, then the tail and merge
    kernels) at the layouts it takes: K2/V1 and K2/V2 in bf16 and fp16, float8 metadata, 1-bit
    keys, head_dim 64, GQA 1 and 8, Lq 2, other launch options, with a bool or additive mask and
    sinks. Prints each stage-1 compile's registers and spills."""
    import math

    def storage(b, h, d, kb, vb, dtype, meta=None, T=4096, G=32, R=128):
        tq = math.ceil((T - R) / G) * G
        meta = meta or dtype
        return [torch.zeros(b, h, tq * kb // 32, d, dtype=torch.int32), torch.zeros(b, h, tq // G, d, dtype=meta),
                torch.zeros(b, h, tq // G, d, dtype=meta), torch.zeros(b, h, R, d, dtype=dtype),
                torch.zeros(b, h, tq, d * vb // 32, dtype=torch.int32), torch.zeros(b, h, tq, d // G, dtype=meta),
                torch.zeros(b, h, tq, d // G, dtype=meta), torch.zeros(b, h, R, d, dtype=dtype)]

    bf16, fp16 = torch.bfloat16, torch.float16
    for kb, vb, dtype, meta, d, gqa, lq in ((2, 1, bf16, None, 128, 4, 1), (2, 2, bf16, None, 128, 4, 1),
                                            (2, 1, fp16, None, 128, 8, 1), (2, 1, bf16, torch.float8_e4m3fn, 128, 4, 1),
                                            (1, 2, bf16, None, 64, 1, 1), (2, 1, fp16, None, 64, 2, 2)):
        q = torch.zeros(2, 8 * gqa, lq, d, dtype=dtype)
        yield (f"attend mma K{kb}/V{vb} {dtype} meta {meta} d{d} gqa{gqa} lq{lq}",
               lambda q=q, st=storage(2, 8, d, kb, vb, dtype, meta), kb=kb, vb=vb: attend.attend(
                   q, *st, torch.tensor(3000), kb, vb, 32, 0.1, variant="mma", splits=3))
    # Launch options: two and four warps per program without the lazy rescale.
    q = torch.zeros(2, 32, 1, 128, dtype=bf16)
    for cfg in (attend.attend_mma.MmaConfig(num_warps=2, lazy=False, ctas_per_sm=4),
                attend.attend_mma.MmaConfig(num_warps=4, lazy=False, ctas_per_sm=2)):
        yield (f"attend mma K2/V1 bf16, {cfg}",
               lambda q=q, st=storage(2, 8, 128, 2, 1, bf16), cfg=cfg: attend.attend(
                   q, *st, torch.tensor(3000), 2, 1, 32, 0.1, variant="mma", splits=3, config=cfg))
    # Model decode steps: transformers' mask (bool, or additive), sink tokens; the tail's programs
    # in stage 1's launch (the default at this capacity) and in a launch of their own.
    for (kb, vb, dtype, mask_dtype, sinks), tail in itertools.product(
            ((2, 1, bf16, torch.bool, 4), (2, 2, fp16, fp16, 0)), (None, False)):
        q = torch.zeros(2, 32, 1, 128, dtype=dtype)
        mask = torch.ones(2, 1, 1, 4000, dtype=torch.bool)
        mask = mask if mask_dtype == torch.bool else torch.zeros(mask.shape, dtype=mask_dtype)
        sink = {"k_sink": torch.zeros(2, 8, sinks, 128, dtype=dtype),
                "v_sink": torch.zeros(2, 8, sinks, 128, dtype=dtype)} if sinks else {}
        cfg = attend.attend_mma.MmaConfig(tail_programs=tail)
        yield (f"attend mma K{kb}/V{vb} {dtype} {mask_dtype} mask, {sinks} sinks, {cfg}",
               lambda q=q, st=storage(2, 8, 128, kb, vb, dtype), kb=kb, vb=vb, mask=mask, sink=sink, cfg=cfg:
               attend.attend(q, *st, torch.tensor(3000), kb, vb, 32, 0.1, mask, variant="mma", splits=3, config=cfg,
                             **sink))


def main() -> int:
    launches: list = []
    moe.launch = record(launches)
    attend.launch = record(launches)
    for name, call in (*scenarios(), *attend_scenarios()):
        before = len(launches)
        call()
        assert len(launches) > before, f"{name}: no kernel launched"
    seen, copied = set(), set()
    for kernel, args, kwargs in launches:
        if kernel.__name__ not in copied:  # once per kernel: the source Inductor compiles
            copied.add(kernel.__name__)
            compile_launch(inductor_copy(kernel), args, kwargs)
            print("inductor copy", kernel.__name__, flush=True)
        key = (kernel.__name__, tuple(sorted((k, v) for k, v in kwargs.items())),
               tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
        if key in seen:
            continue
        seen.add(key)
        regs, spills = compile_launch(kernel, args, kwargs)
        print("compiled", kernel.__name__, {k: v for k, v in kwargs.items() if k.isupper() and k != "INTERPRET"},
              f"{regs} regs, {spills} spills", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
