"""Reasoning outputs (`--reasoning-parser qwen3`, vLLM's): a chat answer's thinking, <think>...</think>, goes to
`reasoning_content`, the rest to `content`.

Qwen3 opens its thinking with <think> itself, or its chat template opens it in the prompt (Qwen3 thinking models):
a prompt whose last <think> is still open starts the answer inside it. An answer that never enters <think> is all
content (thinking switched off: enable_thinking false). Streamed text is split as it comes; a tag cut between two
deltas is held back until it is whole.
"""
from __future__ import annotations

PARSERS = ("qwen3",)
THINK, END_THINK = "<think>", "</think>"
MESSAGE_START = "<|im_start|>"  # Qwen3's template (ChatML) opens each message, and the answer's prompt, with it


class ThinkSplitter:
    """One choice's text, fed in pieces: each piece comes back as (reasoning, content)."""

    def __init__(self, prompt_text: str):
        self.mode = "reasoning" if prompt_text.rfind(THINK) > prompt_text.rfind(END_THINK) else "start"
        self._held = ""  # text that may be the start of the tag being looked for

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        text, self._held = self._held + text, ""
        reasoning = content = ""
        while text:
            if self.mode == "start":  # only the answer's first characters may open the thinking
                stripped = text.lstrip()
                if stripped.startswith(THINK):
                    self.mode, text = "reasoning", stripped[len(THINK):]
                elif THINK.startswith(stripped) and not final:
                    self._held = text
                    return reasoning, content
                else:
                    self.mode = "content"
            elif self.mode == "reasoning":
                end = text.find(END_THINK)
                if end >= 0:
                    reasoning += text[:end]
                    self.mode, text = "after", text[end + len(END_THINK):]
                    continue
                keep = 0 if final else _partial_tag(text, END_THINK)
                reasoning += text[: len(text) - keep]
                self._held = text[len(text) - keep:]
                return reasoning, content
            elif self.mode == "after":  # the newlines Qwen3 writes after </think> open no content
                text = text.lstrip("\n")
                if text or final:
                    self.mode = "content"
            else:
                content += text
                text = ""
        return reasoning, content


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (it may be completed by the next piece)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
