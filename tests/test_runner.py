"""ModelRunner: device/dtype/backend choice, packed weights, KV groups and cache layout, step inputs, invariances."""
import pytest
import torch
from model_helpers import Blocks, tiny_checkpoint

from adallm_core.checkpoint.read import Checkpoint
from adallm_core.config import EngineArgs
from adallm_core.models.layers import Linear, NVFP4LinearMethod
from adallm_core.nvfp4 import NVFP4Weight
from adallm_core.runner import ModelRunner, SeqStep

BS = 4


def runner_for(family="qwen3", fmt="modelopt", **kw) -> ModelRunner:
    ckpt = Checkpoint(tiny_checkpoint(family, fmt))
    args = dict(model=str(ckpt.path), block_size=BS, max_model_len=128, kv_cache_dtype="bf16")
    args.update(kw)
    runner = ModelRunner(EngineArgs(**args), ckpt, "cpu")
    runner.allocate_kv_cache([64] * len(runner.kv_groups))
    return runner


@pytest.fixture(scope="module")
def qwen3():
    return runner_for()


def tokens(n, seed=0):
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cpu_defaults_fp32_and_reference_backend(qwen3):
    assert qwen3.dtype == torch.float32 and qwen3.kernel_backend == "reference"
    assert qwen3.model.embed_tokens.dtype == torch.float32
    assert qwen3.kv_caches[0].dtype == torch.float32  # unquantized KV keeps the activations' precision


def test_triton_backend_is_refused_on_cpu_before_loading():
    ckpt = Checkpoint(tiny_checkpoint("qwen3", "modelopt"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ModelRunner(EngineArgs(model=str(ckpt.path), kernel_backend="triton"), ckpt, "cpu")


def test_max_model_len_beyond_the_model_is_refused():
    ckpt = Checkpoint(tiny_checkpoint("qwen3", "modelopt"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelRunner(EngineArgs(model=str(ckpt.path), max_model_len=10**6), ckpt, "cpu")


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_linear_weights_stay_packed(family):
    runner = runner_for(family, "compressed-tensors")
    cfg = runner.model_config
    linears, packed_bytes = [], 0
    for layer in runner.model.layers:
        attn = layer.self_attn
        linears += [attn.qkv_proj, attn.o_proj]
        if hasattr(layer.mlp, "w13"):
            for w in (layer.mlp.w13, layer.mlp.w2):
                assert isinstance(w, NVFP4Weight) and w.packed.dtype == torch.uint8
            assert layer.mlp.w13.packed.shape == (cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size // 2)
        else:
            linears += [layer.mlp.gate_up_proj, layer.mlp.down_proj]
    for lin in linears:
        assert isinstance(lin.method, NVFP4LinearMethod) and isinstance(lin.weight, NVFP4Weight)
        packed_bytes += lin.weight.nbytes
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    assert linears[0].weight.packed.shape == (q + 2 * kv, cfg.hidden_size // 2)  # q|k|v fused, still packed
    # 4.5 bits a weight + a 4-byte global scale per row
    dense_params = sum(lin.weight.out_features * lin.weight.in_features for lin in linears)
    rows = sum(lin.weight.out_features for lin in linears)
    assert packed_bytes == dense_params * 9 // 16 + 4 * rows
    assert isinstance(runner.model.lm_head, Linear) and isinstance(runner.model.lm_head.weight, torch.Tensor)


def test_gemma3_kv_groups_block_bytes_and_cache_layout():
    runner = runner_for("gemma3", "modelopt", kv_cache_dtype="fp8")
    groups = runner.kv_groups
    assert [(g.sliding_window, g.layers) for g in groups] == [(None, (1,)), (16, (0, 2, 3))]
    per_layer = 2 * BS * 2 * 16  # K and V, block_size, 2 KV heads, head_dim 16, 1 byte (fp8)
    assert runner.kv_block_bytes() == [per_layer, 3 * per_layer]
    runner.allocate_kv_cache([5, 7])
    assert [tuple(c.shape) for c in runner.kv_caches] == [(1, 2, 5, BS, 2, 16), (3, 2, 7, BS, 2, 16)]
    attn = runner.model.attention_layers()
    assert attn[2].k_cache.data_ptr() == runner.kv_caches[1][1, 0].data_ptr()
    assert attn[1].sliding_window is None and attn[0].sliding_window == 16
    assert runner_for("gemma3", "modelopt").kv_block_bytes() == [4 * per_layer, 12 * per_layer]  # fp32 KV on CPU


def test_batch_composition_does_not_change_logits(qwen3):
    """A sequence's logits are the same alone and next to other prefills and decodes."""
    blocks = Blocks(BS, 1)
    a, b, c = tokens(11, 1), tokens(6, 2), tokens(9, 3)
    alone = qwen3.execute([SeqStep(a, 0, blocks.tables_for("a", 11))])[0]
    blocks.tables_for("b", 6)
    qwen3.execute([SeqStep(b, 0, blocks.tables_for("b", 6))])
    b_alone = qwen3.execute([SeqStep(b[-1:], 6, blocks.tables_for("b", 7))])[0]  # rewrites the same KV slot
    mixed = qwen3.execute([
        SeqStep(b[-1:] , 6, blocks.tables_for("b", 7)),
        SeqStep(a, 0, blocks.tables_for("a2", 11)),
        SeqStep(c, 0, blocks.tables_for("c", 9), sample=False),
    ])
    assert mixed.shape[0] == 2  # only sampled sequences come back, in order
    torch.testing.assert_close(mixed[1], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[0], b_alone, rtol=0, atol=1e-5)


def test_chunked_prefill_equals_one_prefill(qwen3):
    blocks = Blocks(BS, 1)
    p = tokens(23, 4)
    whole = qwen3.execute([SeqStep(p, 0, blocks.tables_for("whole", 23))])[0]
    for start, stop in [(0, 5), (5, 14), (14, 23)]:
        last = qwen3.execute([SeqStep(p[start:stop], start, blocks.tables_for("chunked", stop), sample=stop == 23)])
    torch.testing.assert_close(last[0], whole, rtol=0, atol=1e-5)


def test_execute_rejects_bad_steps(qwen3):
    t = [[1, 2, 3]]
    with pytest.raises(ValueError, match="at least one"):
        qwen3.execute([])
    with pytest.raises(ValueError, match="needs >= 1 token"):
        qwen3.execute([SeqStep([], 0, t)])
    with pytest.raises(ValueError, match="exceeds max_model_len 128"):
        qwen3.execute([SeqStep([5], 128, [list(range(1, 34))])])
    with pytest.raises(ValueError, match="2 block tables, model has 1"):
        qwen3.execute([SeqStep([5], 0, t * 2)])
    with pytest.raises(ValueError, match="block table 0 has 3 blocks, 4 needed"):
        qwen3.execute([SeqStep(tokens(13), 0, t)])
    with pytest.raises(ValueError, match=r"block table 0 holds ids outside \[0, 64\)"):
        qwen3.execute([SeqStep([5], 0, [[64]])])
    fresh = ModelRunner(EngineArgs(block_size=BS), Checkpoint(tiny_checkpoint("qwen3", "modelopt")), "cpu")
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        fresh.execute([SeqStep([5], 0, t)])


def test_fp8_kv_scales_come_from_the_checkpoint(monkeypatch):
    monkeypatch.setattr(Checkpoint, "kv_scales", lambda self: {0: (0.5, 0.25)})
    runner = runner_for(kv_cache_dtype="fp8")
    attn = runner.model.attention_layers()
    assert (attn[0].k_scale, attn[0].v_scale) == (0.5, 0.25)
    assert (attn[1].k_scale, attn[1].v_scale) == (1.0, 1.0)
    blocks = Blocks(BS, 1)
    scaled = runner.execute([SeqStep(tokens(9), 0, blocks.tables_for(0, 9))])[0]
    monkeypatch.setattr(Checkpoint, "kv_scales", lambda self: {})
    plain = runner_for(kv_cache_dtype="fp8").execute([SeqStep(tokens(9), 0, Blocks(BS, 1).tables_for(0, 9))])[0]
    assert 0 < (scaled - plain).abs().max() < 0.05 * plain.abs().max()  # scales change the rounding, not the result


class _MultimodalView:
    """A text-only Gemma3 checkpoint seen as Gemma3ForConditionalGeneration (transformers 5 names the decoder
    model.language_model.*), as the published Gemma3 NVFP4 checkpoints are."""

    def __init__(self, ckpt):
        from transformers import Gemma3Config

        self.inner, self.path = ckpt, ckpt.path
        self.hf_config = Gemma3Config(text_config=ckpt.hf_config.to_dict(),
                                      architectures=["Gemma3ForConditionalGeneration"])

    def _inner(self, name):
        if not name.startswith("model.language_model."):
            raise KeyError(name)
        return "model." + name[len("model.language_model."):]

    def has(self, name):
        return name.startswith("model.language_model.") and self.inner.has(self._inner(name))

    def tensor(self, name):
        return self.inner.tensor(self._inner(name))

    def linear(self, prefix):
        return self.inner.linear(self._inner(prefix))

    def kv_scales(self):
        return self.inner.kv_scales()


def test_gemma3_multimodal_checkpoint_runs_its_text_decoder():
    ckpt = Checkpoint(tiny_checkpoint("gemma3", "modelopt"))
    args = EngineArgs(model=str(ckpt.path), block_size=BS, max_model_len=128, kv_cache_dtype="bf16")
    plain, wrapped = ModelRunner(args, ckpt, "cpu"), ModelRunner(args, _MultimodalView(ckpt), "cpu")
    assert wrapped.model_config.architecture == "Gemma3ForConditionalGeneration"
    assert wrapped.model_config.sliding_window == 16 and wrapped.model_config.tie_word_embeddings
    logits = []
    for r in (plain, wrapped):
        r.allocate_kv_cache([16] * len(r.kv_groups))
        logits.append(r.execute([SeqStep(tokens(20), 0, Blocks(BS, 2).tables_for(0, 20))])[0])
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_unquantized_checkpoint_runs_on_dense_linears():
    """A BF16 checkpoint (no quantization) runs on the dense linear method and matches transformers."""
    from transformers import AutoModelForCausalLM

    from adallm_core.models.layers import DenseLinearMethod

    path = tiny_checkpoint("gemma3", None)
    runner = runner_for("gemma3", None)
    assert isinstance(runner.model.layers[0].self_attn.qkv_proj.method, DenseLinearMethod)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = tokens(21, 9)
    ours = runner.execute([SeqStep(p, 0, Blocks(BS, 2).tables_for(0, 21))])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0, -1]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_logits_into_a_given_buffer_equal_fresh_ones_and_transformers_softcap():
    """compute_logits(out=) (the decode graphs' shared buffer) writes what it returns fresh: the softcap, which
    Gemma3 checkpoints may set, applied in place as transformers applies it. A small cap so it saturates."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    runner = runner_for("gemma3", None)
    model = runner.model
    model.cfg = dataclasses.replace(model.cfg, final_logit_softcapping=0.05)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gemma3", None), dtype=torch.float32).eval()
    hf.config.final_logit_softcapping = 0.05
    p = tokens(19, 4)
    fresh = runner.execute([SeqStep(p, 0, Blocks(BS, 2).tables_for(0, 19))])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0, -1]
    assert ref.abs().max() > 0.045  # saturated: the cap changes the logits
    torch.testing.assert_close(fresh, ref, rtol=0, atol=1e-5)
    buf = torch.full((4, fresh.numel()), float("nan"))
    compute = model.compute_logits
    model.compute_logits = lambda hidden: compute(hidden, out=buf[: hidden.shape[0]])
    into = runner.execute([SeqStep(p, 0, Blocks(BS, 2).tables_for(1, 19))])[0]
    torch.testing.assert_close(into, fresh, rtol=0, atol=0)
    torch.testing.assert_close(buf[0], fresh, rtol=0, atol=0)
    assert buf[1:].isnan().all()
