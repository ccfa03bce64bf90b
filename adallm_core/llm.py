"""LLM: the offline API (vLLM's names). Submit everything, step until done, return outputs in input order."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from adallm_core.config import EngineArgs
from adallm_core.engine import LLMEngine, next_request_id
from adallm_core.outputs import RequestOutput
from adallm_core.sampling_params import RequestOutputKind, SamplingParams
from adallm_core.tokenizer import Tokenizer

PromptType = Union[str, dict]  # "text" or {"prompt_token_ids": [...]} (or {"prompt": "text"})


class LLM:
    """An engine for offline batches: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: Optional[str] = None, **engine_kwargs):
        self.engine_args = EngineArgs.from_dict({"model": model, **engine_kwargs})
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        items = [(_prompt_of(p), True) for p in prompts]
        return self._run(items, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        # The template writes bos itself: encode the rendered text without adding special tokens again.
        items = [(tok.apply_chat_template(c, add_generation_prompt, **(chat_template_kwargs or {})), False)
                 for c in conversations]
        return self._run(items, sampling_params, use_tqdm)

    def _run(self, items: list[tuple], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"sampling_params: got {len(params)} for {len(items)} prompts")
        engine = self.llm_engine
        ids = []
        try:
            for (prompt, special), p in zip(items, params):
                rid = next_request_id()
                # Only the final output is needed here.
                engine.add_request(rid, prompt, dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY),
                                   add_special_tokens=special)
                ids.append(rid)
        except ValueError as e:
            for rid in ids:  # all or nothing: the batch is rejected as a whole
                engine.abort_request(rid)
            raise ValueError(f"prompt {len(ids)}: {e}") from e
        results: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
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
        return [results[r] for r in ids]


def _prompt_of(p: PromptType):
    if isinstance(p, str):
        return p
    if isinstance(p, dict):
        if "prompt_token_ids" in p:
            return list(p["prompt_token_ids"])
        if "prompt" in p:
            return p["prompt"]
    raise ValueError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {p!r}")


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
