"""LLM: the offline API (vLLM's names). Submit everything, step until done, return outputs in input order."""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional, Sequence, Union

from adallm_core.config import EngineArgs
from adallm_core.engine import LLMEngine, next_request_id
from adallm_core.outputs import Logprob, RequestOutput
from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from adallm_core.tokenizer import chat_template_options, load_chat_template

PromptType = Union[str, dict]  # "text" or {"prompt_token_ids": [...]} (or {"prompt": "text"}): engine.prompt_of


class PromptError(ValueError):
    """A prompt of the batch the engine refused; index: its place in the batch (a caller can name its own source)."""

    def __init__(self, index: int, error: ValueError):
        super().__init__(f"prompt {index}: {error}")
        self.index, self.error = index, error

    def __reduce__(self):  # pickles (and copies) with both arguments
        return type(self), (self.index, self.error)


class LLM:
    """An engine for offline batches: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: Optional[str] = None, **engine_kwargs):
        self.engine_args = EngineArgs.from_dict({"model": model, **engine_kwargs})
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's recommended sampling (generation_config.json), which generate and chat use when given no
        SamplingParams, as vLLM's LLM does; SamplingParams() where the model recommends nothing."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer, as vLLM's LLM.get_tokenizer gives it."""
        return self.llm_engine.tokenizer.hf

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: Union[bool, Callable] = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif not isinstance(prompts, Sequence):  # None or a number: not a bare TypeError from the loop below
            raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        items = [(p, True) for p in prompts]  # dicts are read by the engine (engine.prompt_of)
        return self._run(items, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: Union[bool, Callable] = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
             tools: Optional[list[dict]] = None, chat_template: Optional[str] = None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations. With
        continue_final_message the last (assistant) message is continued, not closed (vLLM's option). tools: OpenAI's
        function definitions, which the chat template shows the model (vLLM's). chat_template: a Jinja template, or a
        file holding one, for this call in place of the model's (vLLM's)."""
        conversations = _conversations(messages)
        try:
            kwargs = chat_template_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
        except ValueError as e:
            raise ValueError(f"chat: {e}") from None
        if tools is not None:
            kwargs["tools"] = tools
        if chat_template is not None:
            try:
                kwargs["chat_template"] = load_chat_template(chat_template)
            except ValueError as e:
                raise ValueError(f"chat: {e}") from None
        tok = self.llm_engine.tokenizer
        # The template writes bos itself: encode the rendered text without adding special tokens again.
        items = [(tok.apply_chat_template(template_messages(c), **kwargs), False) for c in conversations]
        return self._run(items, sampling_params, use_tqdm)

    def _run(self, items: list[tuple], sampling_params, use_tqdm) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(items)
        elif not isinstance(sampling_params, Sequence):  # a dict of options would be read as its keys
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them (one per prompt), got "
                             f"{type(sampling_params).__name__}")
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"sampling_params: got {len(params)} for {len(items)} prompts")
        bad = next((i for i, p in enumerate(params) if not isinstance(p, SamplingParams)), None)
        if bad is not None:
            raise ValueError(f"sampling_params[{bad}] must be a SamplingParams, got {type(params[bad]).__name__}")
        engine = self.llm_engine
        ids = []
        try:
            for (prompt, special), p in zip(items, params):
                rid = next_request_id()
                # Only the final output is needed here.
                engine.add_request(rid, prompt, dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY),
                                   add_special_tokens=special)
                ids.append(rid)
        except BaseException as e:  # a bad prompt, or Ctrl-C while tokenizing: the batch leaves nothing behind
            for rid in ids:
                engine.abort_request(rid)
            if isinstance(e, ValueError):
                raise PromptError(len(ids), e) from e
            raise
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = None
        try:  # the bar too: a caller's tqdm-like callable may refuse our arguments
            bar = _progress(len(ids), use_tqdm) if use_tqdm else None
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        token_text = _token_texts(engine.tokenizer)
        return [_with_logprob_objects(results[r], p, token_text) for r, p in zip(ids, params)]


def _token_texts(tokenizer) -> Callable[[int], str]:
    """token id -> its text (vLLM's decoded_token), each decoded once a batch: logprobs repeat the same tokens."""
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in texts:
            texts[token] = tokenizer.decode([token], skip_special_tokens=False)
        return texts[token]
    return text


def _with_logprob_objects(out: RequestOutput, params: SamplingParams, token_text) -> RequestOutput:
    """The engine's {token: float} entries as vLLM's {token: Logprob}: a vLLM script reads entry[t].logprob."""
    for c in out.outputs:
        if c.logprobs is not None:
            c.logprobs = [_logprob_entry(e, params.logprobs, rank, token_text)
                          for e, rank in zip(c.logprobs, c.logprob_ranks)]
    if out.prompt_logprobs is not None:
        out.prompt_logprobs = [None if e is None else _logprob_entry(e, params.prompt_logprobs, rank, token_text)
                               for e, rank in zip(out.prompt_logprobs, out.prompt_token_ranks)]
    return out


def _logprob_entry(entry: dict[int, float], num_top: int, own_rank: Optional[int], token_text
                   ) -> dict[int, Logprob]:
    """entry: the chosen token first, then the top num_top (the chosen one listed once). A top token's rank is 1 + the
    entries likelier than it (every likelier token is in the top); so is the chosen token's when it is among them
    (the entry then has no more than num_top tokens), else own_rank (the engine's rank of the prompt's or sampled
    token)."""
    values = list(entry.values())
    chosen_in_top = len(entry) <= num_top
    out = {}
    for i, (token, lp) in enumerate(entry.items()):
        rank = 1 + sum(v > lp for v in values) if i > 0 or chosen_in_top else own_rank
        out[token] = Logprob(lp, rank, token_text(token))
    return out


def _progress(total: int, use_tqdm):
    from tqdm.auto import tqdm

    bar = use_tqdm if callable(use_tqdm) else tqdm  # vLLM's use_tqdm also takes a tqdm-like class
    return bar(total=total, desc="Generating", unit="req", dynamic_ncols=True)


def _conversations(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them; anything else is a ValueError naming messages,
    not an error from inside the template."""
    shape = "a conversation (a list of message dicts) or a list of conversations"
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"chat: messages must be {shape}, got {type(messages).__name__}")
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
            raise ValueError(f"chat: messages must be {shape}; conversation {i} is not: {conversation!r:.80}")
    return conversations


def template_messages(conversation: list[dict]) -> list[dict]:
    """The messages as chat templates take them: OpenAI's text parts joined into one string (vLLM's), a null content
    as "", and earlier tool calls' arguments as objects: OpenAI's messages carry them as JSON text, and templates that
    write them with tojson would quote that text again (vLLM parses them too)."""
    out = []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": _joined_text_parts(content, i)}
        elif content is None:  # an assistant that only called: templates concatenate content (the server's rule)
            message = {**message, "content": ""}
        elif not isinstance(content, str):  # the template's own error would name nothing
            raise ValueError(f"chat: message {i}: content must be a string, a list of text parts or None, got "
                             f"{type(content).__name__}")
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_parsed_call(call, i) for call in calls]}
        out.append(message)
    return out


def _joined_text_parts(parts: list, index: int) -> str:
    """[{"type": "text", "text": ...}, ...] -> the texts joined by newlines, as vLLM gives a template that takes a
    string (Qwen3's renders a list as empty content)."""
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"chat: message {index}: content part {kind!r} is not supported (a text model takes "
                             f"{{'type': 'text', 'text': ...}} parts)")
        texts.append(part["text"])
    return "\n".join(texts)


def _parsed_call(call: dict, index: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"chat: message {index}: a tool call's arguments are no JSON: {e}") from None
    return {**call, "function": {**function, "arguments": parsed}}
