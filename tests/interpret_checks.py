"""Run the Triton kernels' logic on the CPU (TRITON_INTERPRET=1, set by the caller) at tiny shapes; print JSON errors.

Run as `TRITON_INTERPRET=1 python tests/interpret_checks.py`; tests/test_kernels_interpret.py does so in a
subprocess, so the interpreter setting never leaks into other tests.
"""
from __future__ import annotations

import json
import os

import torch

import kernel_cases as kc


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    dev = "cpu"
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    one_wave = dict(BLOCK_N=256, num_warps=8, num_stages=1)  # paged_attention.tiles_for's at 128 dims
    results = {
        "linear_m3": kc.case_nvfp4_linear(dev, 3, 32, 64, dict(small, SPLIT_K=1), torch.float32),
        "linear_split3_ragged": kc.case_nvfp4_linear(dev, 5, 24, 160, dict(small, SPLIT_K=3), torch.float32),
        "linear_k_not_tile": kc.case_nvfp4_linear(dev, 2, 16, 48, dict(small, BLOCK_K=64, SPLIT_K=1), torch.float32),
        "linear_swap_ab": kc.case_nvfp4_linear(dev, 3, 32, 64, dict(small, SPLIT_K=1, SWAP_AB=True), torch.float32),
        "linear_swap_ab_split_ragged": kc.case_nvfp4_linear(dev, 5, 24, 160, dict(small, SPLIT_K=3, SWAP_AB=True),
                                                            torch.float32),
        "linear_kernel_order": kc.case_nvfp4_linear(dev, 3, 32, 64, dict(small, SPLIT_K=1), torch.float32, True),
        "linear_kernel_order_split_ragged": kc.case_nvfp4_linear(dev, 5, 24, 160, dict(small, SPLIT_K=3),
                                                                 torch.float32, True),
        # tile-major: K tiles of half a 128-K chunk (BLOCK_K 64) and of two (256), rows past N masked, split, swapped
        "linear_tile_major": kc.case_nvfp4_linear(dev, 3, 32, 256, dict(small, BLOCK_K=64, SPLIT_K=1), torch.float32,
                                             tile_major=True),
        "linear_tile_major_split_masked": kc.case_nvfp4_linear(dev, 5, 48, 384, dict(small, BLOCK_N=32, BLOCK_K=256,
                                                                                     SPLIT_K=2), torch.float32,
                                                               tile_major=True),
        "linear_tile_major_swap_ab": kc.case_nvfp4_linear(dev, 2, 32, 128, dict(small, SPLIT_K=1, SWAP_AB=True),
                                                     torch.float32, tile_major=True),
        # gate|up with the activation in the epilogue: output columns past I masked, split, swapped, tile-major
        "linear_gated_silu_split_masked": kc.case_nvfp4_gated(dev, 5, 24, 160, "silu", dict(small, SPLIT_K=3),
                                                              torch.float32),
        "linear_gated_gelu_tile_major_split": kc.case_nvfp4_gated(dev, 3, 48, 384, "gelu_tanh",
                                                                  dict(small, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2),
                                                                  torch.float32, tile_major=True),
        "linear_gated_swap_ab": kc.case_nvfp4_gated(dev, 2, 16, 64, "silu", dict(small, SPLIT_K=1, SWAP_AB=True),
                                                    torch.float32),
        # the op's own tile choice (pick_config) at 12 tokens, K shorter than one of its K tiles
        "linear_picked_12_short_k": kc.case_nvfp4_linear(dev, 12, 32, 208, None, torch.float32, True),
        # the interpreter reads the scales as bytes, as GPUs before Ada do (nvfp4_gemm.block_scales)
        "linear_every_e4m3_scale": kc.case_every_e4m3_scale(dev, dict(small, BLOCK_K=32, SPLIT_K=1), torch.float32),
        "rms_norm": kc.case_rms_norm(dev, 3, 24, dtype=torch.float32),
        "add_rms_norm_gemma": kc.case_rms_norm(dev, 3, 24, offset=1.0, add=True, dtype=torch.float32),
        "rope": kc.case_rope(dev, 5, 4, 2, 16, dtype=torch.float32),
        "silu_and_mul": kc.case_act(dev, 3, 40, gelu=False, dtype=torch.float32),
        "gelu_tanh_and_mul": kc.case_act(dev, 3, 40, gelu=True, dtype=torch.float32),
        "kv_write_bf16": kc.case_kv_write(dev, 5, 2, 16, fp8=False),  # the interpreter rounds FP8 wrongly
        "qk_norm_rope_cache_bf16": kc.case_qk_norm_rope_cache(dev, 5, 4, 2, 16, torch.float32, offset=1.0,
                                                              dtype=torch.float32),
        # decode from the qkv row: one launch; parts of one key tile, a window, a padding row
        "qk_norm_rope_attention": kc.case_qk_norm_rope_attention(dev, [4, 9, 0, 30, 17], 4, 2, 16, fp8=False,
                                                                 window=12, num_splits=4, dtype=torch.float32,
                                                                 offset=1.0, config=dict(BLOCK_N=4, num_warps=4,
                                                                                         num_stages=2)),
        # the engine's decode launch under a short bound in two 256-key tiles (the tiles of batches that fill the GPU)
        "qk_norm_rope_attention_short_bound": kc.case_qk_norm_rope_attention(dev, [4, 300, 0, 256], 4, 2, 16,
                                                                             fp8=False, dtype=torch.float32,
                                                                             num_splits=1, config=one_wave),
        "attention_mixed": kc.case_attention(dev, [3, 1, 5], [4, 9, 0], hq=4, hk=2, d=16, fp8=False,
                                              dtype=torch.float32),
        # prefill: key tiles wholly below a row tile's diagonal skip the mask; rows of 64 tokens; a window keeps masks
        "attention_prefill_full_tiles": kc.case_attention(dev, [40, 1, 70], [0, 9, 30], hq=4, hk=2, d=16, fp8=False,
                                                          dtype=torch.float32,
                                                          config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                      num_stages=2)),
        "attention_prefill_rows_128": kc.case_attention(dev, [40, 1, 70], [0, 9, 30], hq=4, hk=2, d=16, fp8=False,
                                                        dtype=torch.float32,
                                                        config=dict(BLOCK_M=128, BLOCK_N=16, num_warps=4,
                                                                    num_stages=2)),
        "attention_prefill_window": kc.case_attention(dev, [40, 70], [0, 30], hq=4, hk=2, d=16, fp8=False, window=24,
                                                      dtype=torch.float32,
                                                      config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)),
        "attention_window_split": kc.case_attention(dev, [1, 1], [17, 30], hq=4, hk=2, d=16, fp8=False, window=8,
                                                    num_splits=4, dtype=torch.float32),
        # decode parts sized from the real lengths: 1, 1, 3 and 5 of the 8 used, the rest empty
        "attention_parts_from_lengths": kc.case_attention(dev, [1, 1, 1, 1], [0, 5, 40, 70], hq=4, hk=2, d=16,
                                                          fp8=False, num_splits=8, dtype=torch.float32, calls=2,
                                                          config=dict(BLOCK_N=16, num_warps=4, num_stages=2)),
        "attention_decode_default_parts": kc.case_attention(dev, [1] * 5, [4, 900, 0, 300, 2000], hq=4, hk=2, d=16,
                                                            fp8=False, dtype=torch.float32, rule_splits=16),
        "attention_parts_window": kc.case_attention(dev, [1, 1, 1], [33, 70, 9], hq=4, hk=2, d=16, fp8=False,
                                                    window=40, num_splits=4, dtype=torch.float32, calls=2,
                                                    config=dict(BLOCK_N=16, num_warps=4, num_stages=2)),
        "moe": kc.case_moe(dev, 5, 32, 32, 4, 2, dtype=torch.float32),
        "moe_kernel_order": kc.case_moe(dev, 5, 32, 32, 4, 2, dtype=torch.float32, kernel_order=True),
        "moe_routing": kc.case_moe_routing(dev, 5, 12, 3, True, block_m=4),
        "moe_routing_plain": kc.case_moe_routing(dev, 1, 16, 4, False),
        "moe_routing_chunked": kc.case_moe_routing(dev, 5, 12, 3, True, block_m=4, chunk=4),  # 15 pairs, 4 chunks
        "moe_routing_chunked_ragged": kc.case_moe_routing(dev, 9, 6, 3, False, block_m=4, chunk=8),  # 27 pairs of 32
        "prefill_runs": kc.case_nvfp4_prefill(dev, 5, [24, 8, 8], 48, dtype=torch.float32),
        "prefill_fp8_slab": kc.case_fp8_slab(dev, 40, 96),
        "prefill_fp8_slab_tile_major": kc.case_fp8_slab(dev, 48, 256, tile_major=True),
        "prefill_runs_kernel_order": kc.case_nvfp4_prefill(dev, 5, [24, 8, 8], 48, dtype=torch.float32,
                                                           kernel_order=True),
        "prefill_runs_tile_major": kc.case_nvfp4_prefill(dev, 5, [32, 16, 16], 256, dtype=torch.float32,
                                                         tile_major=True),
        "embedding_ragged": kc.case_embedding(dev, 7, 50, 40, dtype=torch.float32),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
