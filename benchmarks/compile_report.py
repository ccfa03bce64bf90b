"""The Triton kernels a model's decode and prefill steps launch, compiled without a GPU for one it names (Ada by
default: the product's target, which the lent test machine is not), with what each compiled kernel takes.

    python -m benchmarks.compile_report [--shape qwen3-8b] [--arch 89] [--tokens 1,4,9,12,16,32,64,128,256]
                                        [--context 192]

The ops run on the CPU with tensors of the real shapes (random or empty values: nothing is computed) while a hook
takes each launch, compiles it for `--arch` (Triton's whole pipeline and ptxas) and skips it. The launch arguments
are the ops' own, specialization included, so the figures are those a GPU of that architecture would compile: on
sm_90 they equal what the H200 reported for the same kernels (benchmarks/NOTES.md). Per kernel: registers a
thread, spilled bytes, shared memory a block, and the blocks one SM of each GPU of that architecture holds at once.
On Ada, steps of 1-8 tokens run the linears in CUDA C++ (csrc/, tests/test_cuda_source.py), so they do not appear
here; for sm_90 the launches of decode steps that take programmatic dependent launch (ops/pdl.py) compile with it
(PDL=1), as on the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

# An SM's limits (CUDA C++ Programming Guide, compute capabilities table) and the SM count of each GPU
ADA_SM = dict(smem=102400, block_smem=101376, regs=65536, threads=1536, blocks=24)
HOPPER_SM = dict(smem=233472, block_smem=232448, regs=65536, threads=2048, blocks=32)
AMPERE_SM = dict(smem=102400, block_smem=101376, regs=65536, threads=1536, blocks=16)  # sm_86
GPUS = {
    89: {"RTX 4090": dict(ADA_SM, sms=128), "L40S": dict(ADA_SM, sms=142), "L4": dict(ADA_SM, sms=58)},
    90: {"H100 SXM": dict(HOPPER_SM, sms=132)},
    86: {"RTX 3090": dict(AMPERE_SM, sms=82), "A10": dict(AMPERE_SM, sms=72)},
}
RESERVED_SMEM = 1024  # a block's share the driver keeps (sm_80 and later)
TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "NUM_SPLITS", "QK_NORM", "GATED", "FP8_CACHE", "CHUNK", "PDL")


@dataclass
class Compiled:
    """One compiled specialization of a kernel, as a GPU of the target architecture would load it."""

    op: str  # the op call that launched it
    kernel: str
    arch: int  # the compute capability it was compiled for (89: sm_89)
    tiles: dict  # its tile constexprs (TILE_NAMES)
    num_warps: int
    num_stages: int
    shared: int  # bytes of dynamic shared memory a block
    registers: int  # a thread
    spilled: int  # bytes of local memory a thread (stack frame + spills)
    fp_fusion: bool  # multiply-adds fused (the ops pin it on; Triton 3.10's default is off)

    def blocks_per_sm(self, sm: dict) -> int:
        """Blocks one SM holds at once: by shared memory, registers (allocated 256 a warp), threads, blocks."""
        warp_regs = -(-self.registers * 32 // 256) * 256
        by_regs = sm["regs"] // warp_regs // self.num_warps
        by_smem = sm["smem"] // (self.shared + RESERVED_SMEM)
        return min(by_smem, by_regs, sm["threads"] // (32 * self.num_warps), sm["blocks"])


class _TargetDriver:
    """What Triton's launch path asks of its driver before it compiles, for a GPU that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch  # a kernel keeps its target per device: one "device" an architecture, none a real one

    def get_current_stream(self, device=None):
        return 0


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, local bytes a thread) of a cubin's one kernel, by the cuobjdump Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return int(usage["REG"]), int(usage["STACK"]) + int(usage["LOCAL"])


@contextlib.contextmanager
def compiled_for(arch: int):
    """Within: every Triton launch compiles for sm_`arch` instead of running, once per specialization, and the
    ops see that GPU's SM figures and scale format. Yields (records, set_op): records fills with Compiled,
    set_op(name) labels the launches that follow."""
    from triton import knobs
    from triton.runtime.driver import driver

    from adallm_core.ops import pdl
    from adallm_core.ops.triton import nvfp4_gemm, paged_attention

    records: list[Compiled] = []
    seen: set = set()
    label = ["?"]
    sm = next(iter(GPUS[arch].values()))  # what nvfp4_gemm.sm_figures reads, for that GPU

    def hook(*, key, fn, compile, **_):
        jit = fn.jit_function
        if (jit, str(key)) in seen:
            return True
        seen.add((jit, str(key)))
        knobs.runtime.jit_cache_hook = None
        try:
            kernel = jit.preload(compile["specialization_data"])
        finally:
            knobs.runtime.jit_cache_hook = hook
            for cache in jit.device_caches.values():
                cache[0].clear()  # compiled only: a later launch of it must not run
        names = {name: value for (index,), value in compile["constants"].items()
                 if (name := jit.arg_names[index]) in TILE_NAMES}
        registers, spilled = resource_usage(kernel.asm["cubin"])
        records.append(Compiled(label[0], jit.__name__, kernel.metadata.target.arch, names, compile["num_warps"],
                                compile["num_stages"], kernel.metadata.shared, registers, spilled,
                                compile["enable_fp_fusion"]))
        return True  # skip the launch

    previous_driver, previous_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_TargetDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        with mock.patch.object(nvfp4_gemm, "sm_figures", lambda device: sm), \
                mock.patch.object(nvfp4_gemm, "fp8_scales", lambda device: arch >= 89), \
                mock.patch.object(paged_attention, "mma_sync_only", lambda device: arch < 90), \
                mock.patch.object(nvfp4_gemm, "register_cap",
                                  lambda device: nvfp4_gemm.register_cap_for(divmod(arch, 10))), \
                mock.patch.object(pdl, "enabled", lambda device, tokens=1, max_tokens=pdl.MAX_TOKENS:
                                  pdl.allowed(tokens, max_tokens) and pdl.supports(divmod(arch, 10))):
            yield records, lambda name: label.__setitem__(0, name)
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver


class StepInputs:
    """Tensors of one model's real shapes on the CPU; weights built once and reused for every token count."""

    def __init__(self, shape: str, kv_dtype: torch.dtype, block_size: int = 16):
        from benchmarks.random_checkpoint import SHAPES

        cfg = SHAPES[shape][2]
        self.hidden, self.hq, self.hk, self.d = (cfg["hidden_size"], cfg["num_attention_heads"],
                                                 cfg["num_key_value_heads"], cfg["head_dim"])
        self.experts, self.top_k = cfg.get("num_experts"), cfg.get("num_experts_per_tok")
        self.inter = cfg["moe_intermediate_size"] if self.experts else cfg["intermediate_size"]
        self.window = cfg.get("sliding_window")
        self.activation = "gelu_tanh" if shape.startswith("gemma") else "silu"
        self.kv_dtype, self.block_size = kv_dtype, block_size
        h, q, kv = self.hidden, self.hq * self.d, self.hk * self.d
        self.weights = {"qkv": self._linear(q + 2 * kv, h), "o": self._linear(h, q)}
        if self.experts:
            self.weights["w13"] = self._linear(2 * self.inter, h, self.experts)
            self.weights["w2"] = self._linear(h, self.inter, self.experts)
        else:
            self.weights["gate_up"] = self._linear(2 * self.inter, h)
            self.weights["down"] = self._linear(h, self.inter)

    @staticmethod
    def _linear(n: int, k: int, experts: int | None = None):
        from adallm_core.nvfp4 import NVFP4Weight
        from adallm_core.ops.triton.nvfp4_gemm import prepare_nvfp4_weight

        lead = (experts,) if experts else ()
        packed = torch.zeros(*lead, n, k // 2, dtype=torch.uint8)
        scale = torch.ones(*lead, n, k // 16).to(torch.float8_e4m3fn)
        g = torch.ones(*lead, n) if experts else torch.ones(n)
        w = NVFP4Weight(packed, scale, g)
        return w.in_kernel_order() if experts else prepare_nvfp4_weight(w)

    def attention_case(self, q_lens: list[int], seq_lens: list[int]):
        """Caches and metadata of len(q_lens) sequences (values unused: nothing runs)."""
        from adallm_core.ops.metadata import AttentionMetadata

        blocks = max(-(-s // self.block_size) for s in seq_lens)
        tables = torch.zeros(len(seq_lens), blocks, dtype=torch.int32)
        cache = torch.zeros(blocks, self.block_size, self.hk, self.d, dtype=self.kv_dtype)
        qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
        meta = AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32), tables, max(q_lens), max(seq_lens))
        return cache, cache.clone(), meta


def step_calls(inputs: StepInputs, tokens: int, context: int, decode: bool, cuda_linears: bool = True):
    """(op name, call) for the Triton launches of one layer of a step of `tokens` tokens: a decode step of that many
    sequences with `context` keys each, or a prefill chunk of one sequence. With cuda_linears (Ada and later) the
    linears of 1-8 tokens are left out (the CUDA kernel's), as is the prefill path's cuBLAS GEMM always (its slab
    dequantization is in)."""
    from adallm_core.ops import cuda_gemv
    from adallm_core.ops import triton as ops
    from adallm_core.ops.triton import nvfp4_prefill

    s, w, t = inputs, inputs.weights, tokens
    x = torch.zeros(t, s.hidden, dtype=torch.bfloat16)
    on_cuda_kernel = cuda_linears and t <= cuda_gemv.DECODE_TOKENS

    def linear(name, x):
        weight = w[name]
        if t >= nvfp4_prefill.MIN_TOKENS:
            return lambda: nvfp4_prefill.dequantize_rows(weight, 0, 256, torch.empty(256, weight.in_features,
                                                                                      dtype=torch.bfloat16))
        if name == "gate_up":
            return lambda: ops.nvfp4_gated_linear(x, weight, s.activation)
        return lambda: ops.nvfp4_linear(x, weight)

    yield "add_rms_norm", lambda: ops.add_rms_norm(x, x, torch.ones(s.hidden, dtype=torch.bfloat16), 1e-6)
    if not on_cuda_kernel:
        yield "qkv", linear("qkv", x)
    qkv = torch.zeros(t, (s.hq + 2 * s.hk) * s.d, dtype=torch.bfloat16)
    q_lens, seq_lens = ([1] * t, [context] * t) if decode else ([t], [context + t])
    norm = torch.ones(s.d, dtype=torch.bfloat16)
    positions, slots = torch.zeros(t, dtype=torch.int64), torch.zeros(t, dtype=torch.int64)
    cos_sin = torch.zeros(max(seq_lens), s.d)
    for window in dict.fromkeys([None, s.window]):
        k_cache, v_cache, meta = s.attention_case(q_lens, seq_lens)
        yield f"attention{'' if window is None else ' (window)'}", lambda: ops.qk_norm_rope_attention(
            qkv, norm, norm, 1e-6, 0.0, positions, cos_sin, k_cache, v_cache, slots, 1.0, 1.0, s.hq, s.hk, meta,
            s.d ** -0.5, window)
    attn_out = torch.zeros(t, s.hq * s.d, dtype=torch.bfloat16)
    if not on_cuda_kernel:
        yield "o", linear("o", attn_out)
    if s.experts:
        logits = torch.zeros(t, s.experts, dtype=torch.bfloat16)
        yield "moe", lambda: ops.moe(x, logits, w["w13"], w["w2"], s.top_k, True)
    elif not on_cuda_kernel:
        yield "gate_up", linear("gate_up", x)
        yield "down", linear("down", torch.zeros(t, s.inter, dtype=torch.bfloat16))


def report(shape: str, arch: int, tokens: list[int], context: int) -> list[Compiled]:
    kv_dtype = torch.float8_e4m3fn if arch >= 89 else torch.bfloat16
    inputs = StepInputs(shape, kv_dtype)
    with compiled_for(arch) as (records, set_op):
        for t in tokens:
            for decode in ([True, False] if t > 1 else [True]):
                if not decode and t < 16:
                    continue  # prefill chunks this short are not worth a row
                for name, call in step_calls(inputs, t, context, decode, cuda_linears=arch >= 89):
                    set_op(f"{'decode' if decode else 'prefill'} {t}: {name}")
                    call()
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from benchmarks.random_checkpoint import SHAPES

    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--arch", type=int, choices=sorted(GPUS), default=89)
    p.add_argument("--tokens", default="1,4,9,12,16,32,64,128,256")
    p.add_argument("--context", type=int, default=192, help="keys a decode step's sequences have")
    args = p.parse_args(argv)
    records = report(args.shape, args.arch, [int(v) for v in args.tokens.split(",")], args.context)
    gpus = GPUS[args.arch]
    sm = next(iter(gpus.values()))
    counts = ", ".join(f"{name} {figures['sms']}" for name, figures in gpus.items())
    print(f"{args.shape}, compiled for sm_{args.arch} on this machine (no GPU; weights empty, shapes real). "
          f"Blocks/SM: what one SM holds at once (SMs: {counts})")
    print(f"{'first launched by':<28} {'kernel':<28} {'tiles':<50} {'warps':>5} {'stages':>6} {'regs':>4} "
          f"{'spill':>5} {'smem KB':>7} {'blocks/SM':>9}")
    for r in records:
        tiles = " ".join(f"{k.split('_')[-1] if k.startswith('BLOCK') else k}={int(v)}" for k, v in r.tiles.items())
        print(f"{r.op:<28} {r.kernel:<28} {tiles:<50} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>4} "
              f"{r.spilled:>5} {r.shared / 1024:>7.1f} {r.blocks_per_sm(sm):>9}")
    too_big = [r for r in records if r.shared > sm["block_smem"]]
    print(f"{len(records)} kernels; spilling: {sum(r.spilled > 0 for r in records)}; over a block's shared memory "
          f"({sm['block_smem']} bytes): {len(too_big)}")


if __name__ == "__main__":
    main()
