"""Tokenizer wrapper and incremental detokenizer on a small byte-level BPE that splits multi-byte characters."""
import json

import pytest
from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from adallm_core.checkpoint.files import CheckpointError
from adallm_core.tokenizer import IncrementalDetokenizer, Tokenizer, bytes_of_token_text, chat_template_options

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<bos>", "<eos>", "<|end|>"])
    raw.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


def stream(tok, prompt, ids, stop=()):
    d = IncrementalDetokenizer(tok, prompt, stop)
    shown, stops = [], []
    for t in ids:
        stops.append(d.update(t))
        shown.append(d.output_text(finished=False))
    return d, shown, stops


def test_eos_ids_from_generation_config_then_tokenizer(tok):
    assert tok.eos_token_ids == (2, 1)


def test_multibyte_characters_are_never_split(tok):
    text = "héllo 你好 wörld 🙂!"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.hf.decode([i]) for i in ids), "the test needs tokens holding partial characters"
    prompt = tok.encode("hello ")
    d, shown, _ = stream(tok, prompt, ids)
    assert all("\ufffd" not in s for s in shown)
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))  # text only grows
    assert d.text == tok.hf.decode(ids) == text


def test_a_stray_byte_does_not_stall_the_stream(tok):
    stray = tok.hf.convert_tokens_to_ids("ä")  # byte 0xE4 alone: the lead byte of a 3-byte character
    ids = [stray] + tok.encode(" the fox", add_special_tokens=False)
    _, shown, _ = stream(tok, tok.encode("hello"), ids)
    assert shown[0] == ""  # could still become a character
    assert shown[-1] == tok.hf.decode(ids) == "\ufffd the fox"


def test_stop_string_across_token_boundaries(tok):
    ids = tok.encode("the quick brown fox jumps", add_special_tokens=False)
    stop = "k bro"
    d, shown, stops = stream(tok, tok.encode("hello"), ids, stop=[stop])
    hit = next(i for i, s in enumerate(stops) if s)
    pieces = [tok.hf.decode([t]) for t in ids[: hit + 1]]
    assert stop not in pieces[-1] and stop in "".join(pieces)  # the match spans tokens
    assert stops[hit] == stop and d.text == "the quic"
    assert all(stop not in s for s in shown)


def test_text_that_may_start_a_stop_string_is_held_back(tok):
    d = IncrementalDetokenizer(tok, tok.encode("x"), stop=["fox!"])
    for t in tok.encode("the quick brown fo", add_special_tokens=False):
        d.update(t)
    assert d.text == "the quick brown fo"
    assert d.output_text(finished=False) == "the quick brown "
    for t in tok.encode("x jumps", add_special_tokens=False):
        assert d.update(t) is None
    assert d.output_text(finished=False) == "the quick brown fox jumps"


def test_text_is_not_held_back_when_the_stop_string_stays_in_the_output(tok):
    """include_stop_str_in_output: the text ends with the stop string anyway, so nothing is held back (vLLM's
    stop buffer is 0 then): "fo" is shown at once."""
    d = IncrementalDetokenizer(tok, tok.encode("x"), stop=["fox!"], include_stop=True)
    for t in tok.encode("the quick brown fo", add_special_tokens=False):
        d.update(t)
    assert d.output_text(finished=False) == "the quick brown fo"


@pytest.mark.parametrize("stop", [[" b"], [" b", "a much longer stop string"]])
def test_stop_strings_ended_before_min_tokens_are_not_looked_for_later(tok, stop):
    """The engine checks stop strings after min_tokens tokens (check_stop, vLLM's rule): a match that ended in the
    text of earlier tokens never stops the request later, whatever other stop strings are set (their lengths widen
    no search)."""
    ids = tok.encode(" x y z a b c d", add_special_tokens=False)
    text = tok.decode(ids)
    at = next(i for i in range(len(ids)) if " b" in tok.decode(ids[: i + 1]))  # the token that completes " b"
    for min_tokens, expected in ((at + 1, (None, text)), (at, (" b", text[: text.index(" b")]))):
        d = IncrementalDetokenizer(tok, [0], stop)
        found = [d.update(t, check_stop=i + 1 > min_tokens) for i, t in enumerate(ids)]
        assert (found[-1], d.output_text(finished=True)) == expected


def test_earliest_of_several_stop_strings_wins(tok):
    d = IncrementalDetokenizer(tok, [0], stop=["lazy", "over"])
    stops = [d.update(t) for t in tok.encode("jumps over the lazy dog", add_special_tokens=False)]
    assert "over" in stops and d.text == "jumps "


def test_stop_strings_completed_by_one_token_end_at_the_earliest_match(tok):
    """Both "ck" and "quick" are complete once "quick" is: the text ends where the first match in the text begins
    ("quick" at 4), whatever the order of the stop list."""
    for stop in (["ck", "quick"], ["quick", "ck"]):
        d = IncrementalDetokenizer(tok, [0], stop=stop)
        stops = [d.update(t) for t in tok.encode("the quick brown", add_special_tokens=False)]
        assert next(s for s in stops if s) == "quick" and d.text == "the "


def test_streamed_text_never_shows_what_a_stop_string_later_cuts(tok):
    """While "fox!" may still be completing, its longest started prefix ("fox", one char short) is held back: each
    text shown is a prefix of the final "the quick brown "."""
    ids = tok.encode("the quick brown fox!", add_special_tokens=False)
    d, shown, stops = stream(tok, tok.encode("x"), ids, stop=["fox!"])
    assert stops[-1] == "fox!" and d.output_text(finished=True) == "the quick brown "
    assert all("the quick brown ".startswith(s) for s in shown), shown


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_the_output_follow_skip_special_tokens(tok, skip):
    """skip_special_tokens=False keeps a special token's text ("<|end|>") in the output, as transformers' decode
    with the same flag; True drops it."""
    ids = tok.encode("the fox", add_special_tokens=False) + [tok.hf.convert_tokens_to_ids("<|end|>")]
    ids += tok.encode(" jumps", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("x"), skip_special_tokens=skip)
    for t in ids:
        d.update(t)
    assert d.text == tok.hf.decode(ids, skip_special_tokens=skip) == ("the fox jumps" if skip else
                                                                    "the fox<|end|> jumps")


def test_chat_template_and_no_double_bos(tok):
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == "<bos><|user|>hello<|end|><|assistant|>"
    ids = tok.encode_chat(messages)
    assert ids.count(0) == 1 and ids[0] == 0
    assert tok.encode("hello")[0] == 0  # plain prompts do get their bos


def test_missing_chat_template_is_a_clear_error(tok_dir, tmp_path):
    fast = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    fast.chat_template = None
    fast.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_template_that_refuses_the_messages_is_a_value_error_naming_why(tok_dir, tmp_path):
    """Real templates raise on messages they cannot render (Qwen3: no user message; Gemma3: roles that do not
    alternate). That is the caller's mistake, a ValueError (a 400 from the server), not a template crash."""
    fast = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    fast.chat_template = ("{% if messages[-1]['role'] != 'user' %}{{ raise_exception('No user query found in "
                          "messages.') }}{% endif %}{{ messages[-1]['content'] }}")
    fast.save_pretrained(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ValueError, match="chat template rejected the messages: No user query found in messages"):
        tokenizer.encode_chat([{"role": "system", "content": "hi"}])


def test_token_bytes_spell_the_text(tok):
    """Byte-level BPE: the tokens' own bytes, joined, are the text's UTF-8, characters split across tokens too."""
    text = "naïve 你好 € hello"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token is part of a character
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_token_text_names_each_part_of_a_character(tok):
    """Tokens that are part of a character get OpenAI's "bytes:\\x.." spelling (distinct, and read back by the
    responses' bytes field); whole tokens keep their text."""
    ids = tok.encode("你好 hello", add_special_tokens=False)
    texts = [tok.token_text(i) for i in ids]
    partial = [t for t, i in zip(texts, ids) if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 6 and all(t.startswith("bytes:\\x") for t in partial)
    assert len(set(partial)) == len(set(i for i in ids if "\ufffd" in tok.decode([i])))
    assert [bytes_of_token_text(t) for t in texts] == [tok.token_bytes(i) for i in ids]
    assert texts[-1] == tok.decode([ids[-1]]) and "\ufffd" not in texts[-1]


def test_token_text_spells_special_tokens(tok):
    """Logprobs name special tokens as vLLM does (decoded without skipping them): skipped, each read "", so an eos
    in the logprobs was a blank token and all special tokens shared one key of a completion's top_logprobs."""
    specials = ["<bos>", "<eos>", "<|end|>"]
    ids = tok.hf.convert_tokens_to_ids(specials)
    assert [tok.token_text(i) for i in ids] == specials
    assert [bytes_of_token_text(tok.token_text(i)) for i in ids] == [tok.token_bytes(i) for i in ids]


def test_sentencepiece_byte_pieces(tmp_path):
    """A byte-fallback vocabulary (<0xE4>) gives that byte."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "\u2581": 257, "a": 258}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    sp = Tokenizer(tmp_path)
    ids = sp.encode("a你", add_special_tokens=False)
    assert [sp.token_bytes(i) for i in ids if i <= 256] == [bytes([b]) for b in "你".encode()]
    assert [sp.token_text(i) for i in ids if i <= 256] == ["bytes:\\xe4", "bytes:\\xbd", "bytes:\\xa0"]
    assert sp.token_text(258) == "a"


def test_a_leading_space_stripping_tokenizer_keeps_the_space_of_the_first_generated_word(tmp_path):
    """Llama-style SentencePiece decoders strip the text's first space: "\u2581the" alone decodes to "the". The
    output continues the prompt, so its text is the full decode less the prompt's (transformers' decode as the
    reference): " the quick brown fox", which the detokenizer gets by decoding from the prompt's last tokens."""
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    raw.train_from_iterator(["hello world the quick brown fox jumps over the lazy dog"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    sp = Tokenizer(tmp_path)
    ids = sp.encode("hello world the quick brown fox", add_special_tokens=False)
    prompt, generated = ids[:2], ids[2:]
    assert sp.hf.decode(prompt) == "hello world" and sp.hf.decode(generated[:1]) == "the"
    expected = sp.hf.decode(ids)[len(sp.hf.decode(prompt)):]
    assert expected == " the quick brown fox"
    d, shown, _ = stream(sp, prompt, generated)
    assert d.text == shown[-1] == expected


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)])
def test_folder_without_tokenizer_files_is_a_clear_error(tok_dir, tmp_path, keep):
    """A checkpoint copied without its tokenizer: transformers would build an empty tokenizer (every text -> [])."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    for name in keep:
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    with pytest.raises(ValueError, match=rf"{tmp_path}: no tokenizer files \(none of tokenizer\.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["messages", "conversation"])
def test_template_kwargs_naming_the_messages_are_a_value_error(tok, name):
    """chat_template_kwargs {"messages": ...} collided with this wrapper's own parameter: a TypeError that the server
    answered with a 500, where "conversation" (transformers' name) was already the 400 naming the field."""
    messages = [{"role": "user", "content": "hello"}]
    for render in (tok.apply_chat_template, tok.encode_chat):
        with pytest.raises(ValueError, match=r"chat template's arguments \(chat_template_kwargs\)"):
            render(messages, **chat_template_options(True, False, {name: []}))


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer.json", None, r"tokenizer\.json: not valid JSON"),  # None: the file cut in half (a broken download)
    ("tokenizer_config.json", None, r"tokenizer_config\.json: not valid JSON"),
    ("tokenizer_config.json", "[]", r"tokenizer_config\.json: expected a JSON object"),
    ("tokenizer.json", '{"added_tokens": []}', r": the tokenizer files cannot be loaded \(Exception: Model missing"),
])
def test_corrupt_tokenizer_file_is_named(tok_dir, tmp_path, name, content, match):
    """transformers' own errors name no file (a JSONDecodeError, a KeyError, the Rust tokenizer's bare Exception)."""
    for f in tok_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = (tok_dir / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2] if content is None else content.encode())
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/?{match}"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("template, rendered", [
    ("{# a system prompt of one's own, no variables #}You are terse.", "You are terse."),  # a comment only
    ("<|user|>\nHello\n<|assistant|>", "<|user|>\nHello\n<|assistant|>"),  # text over lines, no tag
])
def test_a_chat_template_without_tags_is_taken_as_text(tok_dir, template, rendered):
    """vLLM's --chat-template reads a file of that name when there is one, else takes text holding '{', '}' or a
    newline as the template itself: these were read as file names ('cannot be read')."""
    from adallm_core.tokenizer import load_chat_template

    assert load_chat_template(template) == template
    text = Tokenizer(tok_dir, template).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == rendered
