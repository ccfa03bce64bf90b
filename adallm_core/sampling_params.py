"""SamplingParams: per-request decoding options, vLLM's names. Validated at the boundary."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

from adallm_core.structured_output import StructuredOutputsParams

MAX_LOGPROBS = 20  # OpenAI's bound on top logprobs; a whole-vocabulary row (vLLM's -1) is not offered
GREEDY_BELOW_TEMPERATURE = 1e-5  # vLLM's: smaller temperatures sample as temperature 0 (the argmax)


class ContextLengthError(ValueError):
    """A prompt (or prompt + max_tokens) past max_model_len. Its message opens with OpenAI's and vLLM's words, which
    clients (LiteLLM, for one) read a context-window error from; the server adds OpenAI's code."""

    @classmethod
    def of(cls, max_model_len: int, detail: str) -> "ContextLengthError":
        return cls(f"This model's maximum context length is {max_model_len} tokens (max_model_len), {detail}")


class RequestOutputKind(Enum):
    CUMULATIVE = 0  # each output carries all text/tokens so far
    DELTA = 1  # each output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: Optional[int] = None  # top-N logprobs per generated token (0: only the sampled token's)
    prompt_logprobs: Optional[int] = None  # top-N logprobs per prompt token (0: only the prompt token's own)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # vLLM's: the stop string (or stop token's text) ends the output text
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit (OpenAI's: in [-100, 100])
    structured_outputs: Optional[StructuredOutputsParams] = None  # a grammar the output must follow (or its dict)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalizes too (a str stop, None lists, top_k=-1): the engine calls this again on the params it is given,
        which may have been changed since they were made."""
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_finite_number(value) -> bool:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return False
            # an int past float's range (10**400) is no float either: math.isfinite raises OverflowError on it
            return math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name, shape in (("stop", "a string or a list of strings"), ("stop_token_ids", "a list of integers")):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise bad(name, f"must be {shape}")
            if not isinstance(value, list):
                setattr(self, name, list(value or []))
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise bad(name, "must be a finite number")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):  # a string "false" would read as true
                raise bad(name, "must be a bool")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "must be a RequestOutputKind")
        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (or -1 for off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens={self.max_tokens}")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias, bad)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
            self.structured_outputs.validate()
            if self.min_tokens:  # the grammar alone decides where the output ends
                raise bad("min_tokens", "cannot be combined with structured_outputs")
        self._bias_tensors = None  # logit_bias_tensors()' cache, rebuilt after each check

    def logit_bias_tensors(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """logit_bias as (token ids int64, biases fp32) CPU tensors, built once per check: a map over much of the
        vocabulary would cost the sampler ~0.2 s a step in Python."""
        import torch  # here: the HTTP ingress builds SamplingParams and never loads torch

        # read once into a local: validate() on another thread (AsyncLLM admits on the caller's) may drop the cache
        tensors = getattr(self, "_bias_tensors", None)
        if tensors is None:
            bias = self.logit_bias or {}
            tensors = (torch.tensor(list(bias), dtype=torch.long),
                       torch.tensor(list(bias.values()), dtype=torch.float32))
            self._bias_tensors = tensors
        return tensors

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows to inf (NaN probabilities): such rows take the argmax
        return self.temperature < GREEDY_BELOW_TEMPERATURE


LOGIT_BIAS_LIMIT = 100.0


def _logit_bias(value, bad) -> dict[int, float]:
    """{token id: bias}, keys as ints (JSON gives OpenAI's string keys: "50256")."""
    if not isinstance(value, dict):
        raise bad("logit_bias", "must be a dict of token id -> bias")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdecimal() else key
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise bad("logit_bias", f"key {key!r} is not a token id")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or abs(bias) > LOGIT_BIAS_LIMIT \
                or not math.isfinite(bias):  # in this order: an int past float's range fails the first test
            raise bad("logit_bias", f"the bias of token {key!r} must be a number in [-100, 100]")
        out[token] = float(bias)
    return out
