"""/v1/completions' `echo`: each choice starts with its prompt's text and, when logprobs are asked for, the prompt
tokens' logprobs (the engine's prompt_logprobs; nothing predicts the first token, so it has none), as OpenAI's."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from deployments.llm_server import ChoiceDelta, TokenLogprob


class Echo:
    def __init__(self, prompt_texts: list[str], with_logprobs: bool, prompt_only: bool = False):
        self.prompt_texts = prompt_texts
        self.with_logprobs = with_logprobs
        self.prompt_only = prompt_only  # max_tokens 0: the generated token is dropped, the choice ends at "length"
        self.prompt_logprobs: dict[int, list[TokenLogprob]] = {}  # prompt index -> its tokens' logprobs
        self._echoed: set[int] = set()  # choice indices whose first delta went out

    def record(self, prompt_index: int, logprobs: Optional[list[TokenLogprob]]) -> None:
        """The engine sends a prompt's logprobs once (in the output that first has tokens); n choices share them."""
        if logprobs is not None:
            self.prompt_logprobs[prompt_index] = logprobs

    def prefix(self, prompt_index: int, delta: ChoiceDelta) -> None:
        """Put the prompt in front of a choice's first delta."""
        if self.prompt_only:
            delta.text, delta.num_tokens = "", 0
            delta.logprobs = [] if self.with_logprobs else None
            delta.finish_reason = delta.finish_reason and "length"
        if delta.index in self._echoed:
            return
        self._echoed.add(delta.index)
        delta.text = self.prompt_texts[prompt_index] + delta.text
        if self.with_logprobs:
            delta.logprobs = self.prompt_logprobs.get(prompt_index, []) + (delta.logprobs or [])
