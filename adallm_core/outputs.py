"""What the engine returns: vLLM's RequestOutput / CompletionOutput shapes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# One dict per generated token: {token_id: logprob} holding the sampled token and the top-N.
SampleLogprobs = list[dict[int, float]]
# One entry per prompt token, the first None (nothing predicts it): {token_id: logprob} of that token and the top-N.
PromptLogprobs = list[Optional[dict[int, float]]]


class Logprob(float):
    """vLLM's Logprob (logprob, rank, decoded_token), which LLM's outputs hold: still the float it replaces, so code
    written for vLLM (entry[t].logprob) and for plain floats (math.exp(entry[t])) both read it."""

    def __new__(cls, logprob: float, rank: Optional[int] = None, decoded_token: Optional[str] = None):
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token  # rank: 1 for the likeliest token; None if unknown
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # None while running; "stop" | "length" | "abort"
    stop_reason: Optional[object] = None  # the stop string or token id that ended it, if any
    logprobs: Optional[SampleLogprobs] = None
    cumulative_logprob: Optional[float] = None
    # with logprobs: each sampled token's rank under the model (1 + the tokens more likely), which LLM's Logprob shows
    logprob_ranks: Optional[list[int]] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: Optional[PromptLogprobs] = None  # SamplingParams.prompt_logprobs (DELTA: in one output only)
    # with prompt_logprobs: each prompt token's rank under the model (1: the likeliest; the first None), vLLM's
    # Logprob.rank of the prompt's own tokens
    prompt_token_ranks: Optional[list[Optional[int]]] = None
    # vLLM's field, which its offline LLM leaves None (no per-request stats unless log_stats): scripts that test it
    # run unchanged
    metrics: Optional[object] = None
