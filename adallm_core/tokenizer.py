"""Tokenizer (transformers AutoTokenizer + generation_config.json eos) and the incremental detokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from tokenizers.decoders import DecodeStream

# Prompt tokens given to the decode stream as context, so the first generated token decodes as it would
# after the prompt (leading-space and byte-fallback rules look back a few tokens).
_CONTEXT_TOKENS = 8


class Tokenizer:
    """The model's tokenizer: encode/decode, chat template, and every eos id the model may emit."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.hf = AutoTokenizer.from_pretrained(str(path))
        if not getattr(self.hf, "is_fast", False):
            raise ValueError(f"tokenizer at {path} has no tokenizer.json (fast tokenizer); adallm needs one")
        self.backend = self.hf.backend_tokenizer  # tokenizers.Tokenizer, used by DecodeStream
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        gen = self.path / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))  # unique, in order

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.hf.chat_template:
            raise ValueError(f"tokenizer at {self.path} has no chat template; use generate() with a plain prompt")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template already writes the special tokens (bos): don't add them twice.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


class IncrementalDetokenizer:
    """Text of one sequence, token by token. Never emits half a multi-byte character (DecodeStream holds the
    bytes back), finds stop strings across token boundaries, and holds back text that could still become the
    start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(prompt_token_ids[-_CONTEXT_TOKENS:]),
                                   skip_special_tokens=skip_special_tokens)
        self.stop = list(stop)
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.stop_string: Optional[str] = None

    def update(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Add one token; returns the stop string if this token completed one (the text then ends before it).
        check_stop=False (fewer than min_tokens generated): stop strings are not looked for yet."""
        if self.stop_string is not None:  # finished: later tokens are not part of the text
            return self.stop_string
        piece = self.stream.step(self.tokenizer.backend, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += piece
        hits = [(i, s) for s in self.stop if check_stop and (i := self.text.find(s, search_from)) >= 0]
        if hits:
            index, self.stop_string = min(hits)
            self.text = self.text[:index]
        return self.stop_string

    def output_text(self, finished: bool) -> str:
        """Text safe to show: while running, without a tail that is a proper prefix of a stop string."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]
