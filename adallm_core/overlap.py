"""Async scheduling's device side: a step's greedy tokens stay on the device as the next step's input ids, and
reach the host through a pinned buffer while that next step already runs.

LLMEngine.step with EngineArgs.async_scheduling: when every sequence of step t samples on the device alone (greedy
or random, seeded or not, top-k/p, min-p, min_tokens bans: see Sampler.on_device) and nobody waits to join, the
engine schedules step t+1 right after launching t, with one placeholder token per sequence
(Sequence.num_placeholders), launches it with t's tokens as its input ids, and only then reads t's tokens and does
t's bookkeeping (stop checks, detokenization, outputs) while the GPU runs t+1. A sequence that stopped at t spent
its row of t+1 for nothing; that token is dropped. Everything else (penalties and logprobs, which need the token
history or results on the host; prefills; waiting requests; a tensor-parallel runner) runs step by step as before.
"""
from __future__ import annotations

import torch


class DeviceTokens:
    """One step's sampled tokens: `ids` on the device, a copy on its way to a pinned host buffer."""

    def __init__(self, ids: torch.Tensor, buffer: torch.Tensor, event):
        self.ids = ids
        self._host = buffer[: self.ids.shape[0]]
        self._host.copy_(self.ids, non_blocking=True)
        self._event = event
        if event is not None:
            event.record()

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class TokenBuffers:
    """Two pinned host buffers taken in turn: at most two steps are in flight (the one read now, the next)."""

    def __init__(self, size: int, device: torch.device):
        cuda = device.type == "cuda"
        self._buffers = [torch.empty(size, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._next = 0

    def tokens(self, ids: torch.Tensor) -> DeviceTokens:
        i, self._next = self._next, self._next ^ 1
        return DeviceTokens(ids, self._buffers[i], self._events[i])
