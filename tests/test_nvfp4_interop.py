"""Interop with the compressed-tensors package (an implementation this project did not write)."""
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

from adallm_core import nvfp4
from adallm_core.nvfp4 import E2M1_VALUES, NVFP4Weight

ARGS = QuantizationArgs(
    num_bits=4, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR_GROUP, group_size=16,
    symmetric=True, scale_dtype=torch.float8_e4m3fn,
)


def test_their_packing_unpacks_here_and_ours_unpacks_there():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), generator=gen, dtype=torch.uint8)
    values = E2M1_VALUES[codes.long()]
    theirs = pack_fp4_to_uint8(values)
    assert torch.equal(E2M1_VALUES[nvfp4.unpack_fp4(theirs).long()], values)
    ours = nvfp4.pack_fp4(codes)
    assert torch.equal(unpack_fp4_from_uint8(ours, 6, 64, dtype=torch.float32), values)
    # the bytes agree except where one side writes -0 and the other +0
    assert torch.equal(theirs & 0x77, ours & 0x77)


def test_global_scale_matches_generate_gparam():
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 250.0):
        w = torch.randn(16, 32, generator=gen) * scale
        theirs = generate_gparam(w.min(), w.max())
        ours = nvfp4.global_scale_from_amax(nvfp4.tensor_amax(w), divides=True)
        assert torch.equal(theirs, ours.reshape(1))


def test_their_full_quantization_dequantizes_identically_here():
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(16, 128, generator=gen) * 0.05).to(torch.bfloat16)
    w[3, :16] = 0  # an all-zero block
    g = generate_gparam(w.min(), w.max())
    groups = w.float().unflatten(-1, (-1, 16))
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), ARGS, global_scale=g)
    fp4_values = ct_quantize(w, scale, zp, ARGS, global_scale=g)
    packed = pack_fp4_to_uint8(fp4_values)
    block_scale = scale.to(torch.float8_e4m3fn)

    # their tensors, read through this project's compressed-tensors convention
    theirs = NVFP4Weight.from_compressed_tensors(packed, block_scale, g).dequantize()
    reference = fp4_values.float() * (block_scale.float() / g).repeat_interleave(16, -1)
    torch.testing.assert_close(theirs, reference, rtol=1e-6, atol=0)

    # and this project's quantizer produces the same codes and scales (compressed-tensors writes a tiny eps scale
    # instead of 0 for an all-zero block; both dequantize to zeros)
    our_packed, our_scale = nvfp4.quantize(w, g, divides=True)
    nonzero = w.float().unflatten(-1, (-1, 16)).abs().amax(-1) > 0
    assert torch.equal(our_scale.float()[nonzero], block_scale.float()[nonzero])
    ours = nvfp4.dequantize(our_packed, our_scale, g, divides=True)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
