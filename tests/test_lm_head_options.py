"""EngineArgs.quantize_lm_head (the BF16 lm_head turned into NVFP4 at load) and embedding_on_host, on the CPU.

The reference is transformers' own model class on the dequantized checkpoint with its lm_head quantized by the
compressed-tensors package: the engine's greedy generations must equal its `generate`."""
import pytest
import torch

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.models.base import NVFP4LMHead
from adallm_core.sampling_params import SamplingParams
from engine_fixtures import PROMPTS, make_engine, run_all
from model_helpers import compressed_tensors_nvfp4, hf_on_dequantized, tiny_checkpoint

NEW_TOKENS = 16


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])  # untied and tied lm_head
def test_quantized_lm_head_generates_as_transformers_with_a_compressed_tensors_head(family):
    engine = make_engine(family, "modelopt", quantize_lm_head=True)
    model = engine.runner.model
    assert isinstance(model.lm_head, NVFP4LMHead)
    hf = hf_on_dequantized(family, Checkpoint(tiny_checkpoint(family, "modelopt")))
    dense = hf.lm_head.weight.detach().clone()
    quantized = compressed_tensors_nvfp4(dense)
    assert not torch.equal(quantized, dense)  # the option changes the head: the comparison below can fail
    # same codes and scales; the fp32 products of code x scale x global may round apart in the last bit
    torch.testing.assert_close(model.lm_head.weight.dequantize(), quantized, rtol=1e-6, atol=0)
    # embeddings stay exact, also where the checkpoint ties them to the lm_head
    torch.testing.assert_close(model.embed_tokens.float(), hf.get_input_embeddings().weight.detach(), rtol=0, atol=0)
    hf.lm_head.weight = torch.nn.Parameter(quantized)  # its own parameter now: unties a tied head

    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)  # both stop on generation_config's eos
    for i, ids in enumerate(prompt_ids):
        engine.add_request(str(i), ids, params)
    done = run_all(engine)
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
               for ids in prompt_ids]
    ours = [done[str(i)].outputs[0].token_ids for i in range(len(prompt_ids))]
    assert ours == ref


def test_embedding_on_host_needs_cuda_and_an_unshared_table():
    # on the CPU the table is host memory anyway: nothing is pinned or moved
    engine = make_engine("qwen3", "modelopt", embedding_on_host=True)
    assert not engine.runner.model.embed_tokens.is_pinned()


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning host memory works on a GPU machine")
def test_host_memory_that_cannot_be_pinned_names_the_way_out():
    from adallm_core.models.base import _pinned

    with pytest.raises(RuntimeError, match="could not pin .* --no-embedding-on-host"):
        _pinned(torch.zeros(1024, 64))
