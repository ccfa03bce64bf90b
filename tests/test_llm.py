"""LLM offline API: input order, prompt forms, chat template, all-or-nothing validation, model source."""
import json
import re
import shutil
from pathlib import Path

import pytest

from adallm_core import LLM, SamplingParams
from adallm_core.model_source import resolve_model_path
from engine_fixtures import PROMPTS, greedy_tokens, make_engine, run_all, tiny_model
from model_helpers import interrupted_on_call

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("qwen3"), max_model_len=256, num_gpu_blocks_override=256, kv_cache_dtype="bf16")


def test_generate_returns_outputs_in_input_order(llm):
    ref = greedy_tokens(make_engine("qwen3"), PROMPTS, max_tokens=6)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert [o.prompt for o in outs] == PROMPTS
    tok = llm.get_tokenizer()  # Hugging Face's, as vLLM gives it
    assert all(o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs)
    assert all(o.metrics is None for o in outs)  # vLLM's field, None in its offline LLM (no log_stats)



def test_chat_takes_earlier_tool_calls_arguments_as_objects(llm):
    # OpenAI's messages carry a call's arguments as JSON text; the template writes them with tojson, which would
    # quote the text again
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    assert '"arguments": {"city": "Paris"}' in out.prompt
    assert conv[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's list untouched
    # as OpenAI's client sends back an answer that only called: content null (the template read it and failed)
    assert llm.chat([conv[0], {**conv[1], "content": None}, conv[2]], GREEDY, use_tqdm=False)[0].prompt == out.prompt
    call["function"]["arguments"] = "{oops"
    with pytest.raises(ValueError, match="message 1: a tool call's arguments are no JSON"):
        llm.chat(conv, GREEDY, use_tqdm=False)

def test_prompt_forms_and_per_prompt_params(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[1])
    outs = llm.generate([{"prompt_token_ids": ids}, {"prompt": PROMPTS[1]}, PROMPTS[1]],
                        [GREEDY, GREEDY, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == outs[0].outputs[0].token_ids[:2]
    assert outs[0].prompt is None and outs[0].prompt_token_ids == ids


def test_chat_uses_the_template(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)  # vLLM users' call
    assert out.prompt == rendered
    assert out.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    ref = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    two = llm.chat([conv, conv + [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Ok"}]],
                   GREEDY, use_tqdm=False)
    assert two[0].outputs[0].token_ids == out.outputs[0].token_ids and len(two) == 2


def test_chat_joins_openai_text_parts_as_vllm_does(llm):
    """OpenAI's content parts, which vLLM's chat takes: their texts joined by newlines for a template that renders a
    string (Qwen3's would render the list as empty content, this one failed on it)."""
    tok = llm.get_tokenizer()
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    out = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)[0]
    assert out.prompt == tok.apply_chat_template([{"role": "user", "content": "Hi\nthere"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert parts[0] == {"type": "text", "text": "Hi"}  # the caller's message untouched
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]
    with pytest.raises(ValueError, match="message 0: content part 'image_url' is not supported"):
        llm.chat(image, GREEDY, use_tqdm=False)


@pytest.mark.parametrize(("messages", "named"), [
    ("Hello", "got str"),  # a prompt where a conversation goes: not one conversation per character
    (None, "got NoneType"),
    ([["Hello"]], "conversation 0 is not"),
    ([{"role": "user", "content": "Hi"}, "and then"], "conversation 0 is not"),
])
def test_chat_names_messages_that_are_no_conversation(llm, messages, named):
    """Not an error from inside the template that blames chat_template_kwargs."""
    with pytest.raises(ValueError, match=f"chat: messages must be a conversation .*{named}"):
        llm.chat(messages, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("content", [5, {"text": "Hi"}])
def test_chat_names_a_content_that_is_no_text(llm, content):
    """The template's TypeError on a number was reported as a fault of chat_template_kwargs, which was not given."""
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user",
                                                                                       "content": content}]
    with pytest.raises(ValueError, match=r"chat: message 2: content must be a string, a list of text parts or "
                                         r"None, got (int|dict)") as caught:
        llm.chat(conv, GREEDY, use_tqdm=False)
    assert "chat_template_kwargs" not in str(caught.value)


def test_logprobs_are_vllms_logprob_objects_and_still_floats(llm):
    """vLLM scripts read entry[token].logprob / .rank / .decoded_token (a float has no .logprob); the values are the
    engine's, and code that treats them as floats still works."""
    from adallm_core.outputs import Logprob

    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    raw = llm.llm_engine  # the same request through the engine: its floats
    raw.add_request("raw-logprobs", PROMPTS[1], params)
    ref = run_all(raw)["raw-logprobs"]
    completion = out.outputs[0]
    for token, entry, ref_entry in zip(completion.token_ids, completion.logprobs, ref.outputs[0].logprobs):
        assert list(entry) == list(ref_entry) and all(isinstance(v, Logprob) for v in entry.values())
        assert [v.logprob for v in entry.values()] == list(ref_entry.values()) == list(entry.values())
        assert entry[token].rank == 1  # greedy: the likeliest
        assert sorted(v.rank for v in entry.values()) == [1, 2, 3]
        assert all(v.decoded_token == tok.decode([t]) for t, v in entry.items())
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(completion.token_ids,
                                                                                    completion.logprobs)))
    prompt = out.prompt_logprobs
    assert prompt[0] is None and [e[t].rank for t, e in zip(out.prompt_token_ids[1:], prompt[1:])] == \
        out.prompt_token_ranks[1:]
    sampled = llm.generate(PROMPTS[1], SamplingParams(max_tokens=3, logprobs=0, seed=1), use_tqdm=False)[0].outputs[0]
    for token, entry, rank in zip(sampled.token_ids, sampled.logprobs, sampled.logprob_ranks, strict=True):
        assert list(entry) == [token] and entry[token].rank == rank  # outside any top list: the engine's rank


def test_one_bad_prompt_rejects_the_batch_and_leaves_the_engine_clean(llm):
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate(["Hello", "", "World"], GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.stats()["kv_blocks_used"] == 0
    with pytest.raises(ValueError, match="got 1 for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


@pytest.mark.parametrize(("prompts", "params", "match"), [
    (["Hello", "World"], [GREEDY, {"max_tokens": 3}], r"sampling_params\[1\] must be a SamplingParams, got dict"),
    (["Hello", {"prompt": "Hi", "multi_modal_data": {}}], GREEDY,
     r"prompt 1: prompt dict key\(s\) \['multi_modal_data'\]"),
    ([{"prompt": "Hi", "prompt_token_ids": [5, 6]}], GREEDY, "exactly one of 'prompt' or 'prompt_token_ids'"),
    # wrong types name the argument (they were a bare "object is not iterable", or a dict read as its keys)
    (None, GREEDY, "prompts must be a prompt or a list of prompts, got NoneType"),
    (7, GREEDY, "prompts must be a prompt or a list of prompts, got int"),
    (["Hello"], {"max_tokens": 3}, "sampling_params must be a SamplingParams or a list of them .*got dict"),
    (["Hello"], 3, "sampling_params must be a SamplingParams or a list of them .*got int"),
])
def test_bad_params_or_prompt_dicts_leave_nothing_behind(llm, prompts, params, match):
    """Refused before anything runs, and the next call gets its own outputs (not a leftover's)."""
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(["Hi"], GREEDY, use_tqdm=False)[0].prompt == "Hi"


def test_interrupted_submission_leaves_nothing_behind(llm, monkeypatch):
    """Ctrl-C while a batch is being tokenized: the requests added so far are taken back."""
    tok = llm.llm_engine.tokenizer
    monkeypatch.setattr(tok, "encode", interrupted_on_call(tok.encode, 3))
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b", "c", "d"], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_progress_bar_that_fails_leaves_nothing_behind(llm):
    """use_tqdm may be the caller's own tqdm-like callable (vLLM's): one that refuses our arguments left the batch
    queued, and the next generate ran those requests too."""
    def bar(**kwargs):
        raise TypeError("this bar takes no dynamic_ncols")

    with pytest.raises(TypeError, match="dynamic_ncols"):
        llm.generate(PROMPTS[:2], GREEDY, use_tqdm=bar)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.stats()["kv_blocks_used"] == 0
    ref = greedy_tokens(make_engine("qwen3"), PROMPTS[2:3], max_tokens=6)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[2:3], GREEDY, use_tqdm=False)] == ref


def test_chat_continues_the_final_message_and_template_kwargs_win(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt == tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert out.prompt.endswith("Hello, I am")  # the message left open for the model to go on
    kw = llm.chat(conv[:1], GREEDY, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})[0]
    assert kw.prompt == tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=False)
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conv, GREEDY, use_tqdm=False, continue_final_message=True)
    # not a TypeError "'str' object is not a mapping" that names nothing
    with pytest.raises(ValueError, match="chat: chat_template_kwargs must be a dict, got str"):
        llm.chat(conv[:1], GREEDY, use_tqdm=False, chat_template_kwargs="enable_thinking=False")


# A template unlike the model's, rendered by hand below: the reference is the text itself, not transformers' rendering.
PLAIN_TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_a_chat_template_of_ones_own_replaces_the_models(llm, tmp_path):
    """vLLM's chat_template (LLM.chat's argument, --chat-template for the engine): a template's text or a file."""
    conv = [{"role": "user", "content": "Hi"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False, chat_template=PLAIN_TEMPLATE)[0]
    assert out.prompt == "[user] Hi\n[assistant] "
    assert out.prompt_token_ids == llm.get_tokenizer()("[user] Hi\n[assistant] ", add_special_tokens=False).input_ids
    no_template = Path(shutil.copytree(tiny_model("qwen3"), tmp_path / "base"))
    (no_template / "chat_template.jinja").unlink()  # a base model: no template of its own
    (tmp_path / "plain.jinja").write_text(PLAIN_TEMPLATE)
    base = LLM(str(no_template), max_model_len=256, num_gpu_blocks_override=64, kv_cache_dtype="bf16",
               chat_template=str(tmp_path / "plain.jinja"))
    got = base.chat(conv, GREEDY, use_tqdm=False)[0]
    assert got.prompt == out.prompt and got.outputs[0].token_ids == out.outputs[0].token_ids
    with pytest.raises(ValueError, match="has no chat template; give one"):
        LLM(str(no_template), max_model_len=256, num_gpu_blocks_override=64, kv_cache_dtype="bf16").chat(conv)


@pytest.mark.parametrize("template, message", [
    ("/no/such/template.jinja", "chat_template '/no/such/template.jinja': not a Jinja template, and the file cannot"),
    ("{% for m in messages %}{{ m.content }}", "chat_template: not a valid Jinja template (line 1: Unexpected end"),
    ("", "chat_template must be a Jinja template or the path of a file holding one"),
])
def test_a_bad_chat_template_is_named(llm, template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False, chat_template=template)
    with pytest.raises(ValueError, match=re.escape(message)):  # at start-up, not at the first chat
        LLM(tiny_model("qwen3"), max_model_len=256, num_gpu_blocks_override=64, kv_cache_dtype="bf16",
            chat_template=template)


def test_default_sampling_params_are_the_models_generation_config(llm, tmp_path, monkeypatch):
    """vLLM's LLM samples with the model maker's generation_config.json settings when given no SamplingParams
    (get_default_sampling_params; Qwen3 ships temperature 0.6, top_p 0.95, top_k 20); it used SamplingParams()."""
    assert llm.get_default_sampling_params() == SamplingParams()  # the tiny model recommends nothing
    path = tmp_path / "qwen3"
    shutil.copytree(tiny_model("qwen3"), path)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(config))
    recommended = LLM(str(path), max_model_len=256, num_gpu_blocks_override=64, kv_cache_dtype="bf16")
    expected = (0.6, 0.95, 20, 5)
    defaults = recommended.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == expected
    engine, seen = recommended.llm_engine, []
    add_request = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda rid, prompt, params, **kw: (
        seen.append((params.temperature, params.top_p, params.top_k, params.max_tokens)),
        add_request(rid, prompt, params, **kw)))
    recommended.generate("Hello", use_tqdm=False)
    recommended.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)
    recommended.generate("Hello", GREEDY, use_tqdm=False)  # given params win whole, as in vLLM
    assert seen == [expected, expected, (0.0, 1.0, 0, 6)]
    config["temperature"] = -1
    (path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"generation_config\.json: .*temperature"):
        LLM(str(path), max_model_len=256, num_gpu_blocks_override=64, kv_cache_dtype="bf16")


def test_unknown_engine_argument_is_named():
    with pytest.raises(ValueError, match="max_num_seq\\b"):
        LLM(tiny_model("qwen3"), max_num_seq=3)


def test_kernel_backend_is_visible(llm):
    import torch

    assert llm.llm_engine.kernel_backend == ("triton" if torch.cuda.is_available() else "reference")


def test_model_source_demo_name(tmp_path, monkeypatch):
    import adallm_core.testing

    monkeypatch.setattr(adallm_core.testing, "demo_model_path", lambda: tmp_path / "built-demo")
    assert resolve_model_path(None) == resolve_model_path("demo") == tmp_path / "built-demo"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a real folder called demo wins
    assert resolve_model_path("demo") == Path("demo")


def test_model_source(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no such folder"):
        resolve_model_path("./not/here")


def test_a_tokenizer_path_that_is_no_folder_is_named_as_the_tokenizer(tmp_path):
    """--tokenizer resolves as --model does; its errors called it the model, whose folder was fine."""
    (tmp_path / "tokenizer.json").write_text("{}")
    for path, why in ((tmp_path / "missing", "no such folder"), (tmp_path / "tokenizer.json", "is a file")):
        with pytest.raises(ValueError, match=rf"^tokenizer '{path}'(: | ){why}"):
            make_engine("qwen3", tokenizer=str(path))


def test_a_name_that_is_neither_a_folder_nor_on_the_hub_says_both(monkeypatch):
    """'models/qwen3-typo' looks like a hub id; when the hub cannot give it (here: no network, stubbed), the error
    still says that no such local folder exists."""
    import huggingface_hub

    def offline(repo_id, revision=None):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"model 'models/qwen3-typo': no such folder on host .*, and fetching it "
                                         r"from the Hugging Face hub failed \(LocalEntryNotFoundError: cannot reach"):
        resolve_model_path("models/qwen3-typo")
