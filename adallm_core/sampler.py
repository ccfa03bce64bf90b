"""Sampler: one vectorized pass over the batch with per-request parameters.

Order (vLLM's): the grammar's mask (structured outputs) -> raw logprobs -> min_tokens ban and logit_bias -> penalties
(repetition, then frequency and presence) -> greedy argmax | temperature -> min_p -> top_k -> top_p -> sample.
Sampling is argmax(probs / q) with q ~ Exp(1) (the exponential race, same law as multinomial). A seeded request
draws its q from its own generator seeded from (seed, completion index, step), so its tokens do not depend on what
else is in the batch, nor on preemption.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch

from adallm_core.sampling_params import SamplingParams
from adallm_core.structured_output import apply_grammars

_MASK64 = (1 << 63) - 1


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    index: int = 0  # which of the request's n completions (seeds differ per completion)
    banned_token_ids: tuple[int, ...] = ()  # eos / stop ids while fewer than min_tokens were generated
    num_placeholders: int = 0  # tokens generated before this one whose ids are still on the device (async)
    grammar: Optional[object] = None  # structured outputs: the sequence's matcher (it allows the next tokens)
    grammar_waits: bool = False  # a matcher that starts once the output holds a text: it may start with this token

    @property
    def step(self) -> int:
        """How many tokens this sequence generated before the one sampled now (a seeded row's draw depends on it)."""
        return len(self.output_token_ids) + self.num_placeholders


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[dict[int, float]]]  # per row: sampled token + top-N, None when not requested
    ranks: list[Optional[int]]  # per row with logprobs: the sampled token's rank (1 + the tokens more likely)


def step_seed(seed: int, index: int, step: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + step * 104_729 + 12_345) & _MASK64


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)  # for unseeded requests
        self.row_generator = torch.Generator(self.device)  # re-seeded for each seeded row

    @staticmethod
    def on_device(rows: Seq[SamplingRow]) -> bool:
        """Rows the device samples with nothing from the host but their parameters: no penalties (they read the
        generated tokens), no logprobs (returned beside the token) and no grammar (its mask follows the last token).
        Async scheduling runs a step ahead then."""
        return all(r.params.logprobs is None and not _has_penalty(r.params) and r.grammar is None
                   and not r.grammar_waits for r in rows)

    def sample_on_device(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """The sampled tokens as a device tensor, without waiting for the device (penalties read the rows' token
        lists on the host: async scheduling only sends `on_device` rows here before their step is read). Rows with
        a grammar come through __call__, which masks the logits first."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        logits = logits.float()
        if any(r.banned_token_ids or r.params.logit_bias or _has_penalty(r.params) for r in rows):
            logits = logits.clone()  # the processors below write into the logits: work on a copy
            self._ban(logits, rows)
            self._add_logit_bias(logits, rows)
            self._apply_penalties(logits, rows)
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            return logits.argmax(dim=-1)
        return self._sample(logits, rows, greedy)

    def __call__(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> SamplerOutput:
        """logits: float32 [B, V], one row per entry of `rows` (read only: never written)."""
        params = [r.params for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        if any(r.grammar is not None for r in rows):
            # first, on a copy: vLLM masks the logits before its sampler, so the logprobs are those of what is
            # sampled from, the tokens the grammar allows (the ones it forbids are -inf); what the processors
            # below add to a -inf stays -inf
            logits = logits.to(torch.float32, copy=True)
            apply_grammars(logits, [r.grammar for r in rows])
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want_logprobs else None
        tokens = self.sample_on_device(logits, rows)
        token_list = tokens.tolist()
        out_logprobs: list[Optional[dict[int, float]]] = [None] * len(rows)
        out_ranks: list[Optional[int]] = [None] * len(rows)
        if raw_logprobs is not None:
            n_top = max(p.logprobs or 0 for p in params)
            top_vals, top_ids = raw_logprobs.topk(n_top, dim=-1) if n_top else (None, None)
            chosen_t = raw_logprobs.gather(1, tokens[:, None])
            chosen = chosen_t.squeeze(1).tolist()
            ranks = ((raw_logprobs > chosen_t).sum(dim=-1, dtype=torch.int32) + 1).tolist()  # vLLM's rank, always
            top_vals_l = top_vals.tolist() if n_top else None
            top_ids_l = top_ids.tolist() if n_top else None
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    n = p.logprobs
                    out_logprobs[i] = logprob_entry(token_list[i], chosen[i], top_ids_l[i][:n] if n else [],
                                                    top_vals_l[i][:n] if n else [])
                    out_ranks[i] = ranks[i]
        return SamplerOutput(token_list, out_logprobs, out_ranks)

    # --- logits processors (in place) ---------------------------------------------------------
    def _ban(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> None:
        pairs = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids if t < logits.shape[1]]
        if pairs:
            idx = torch.tensor(pairs, device=logits.device)
            logits[idx[:, 0], idx[:, 1]] = float("-inf")

    def _add_logit_bias(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> None:
        biased = [(i, r.params.logit_bias_tensors()) for i, r in enumerate(rows) if r.params.logit_bias]
        if biased:
            row_ids = torch.cat([torch.full((len(tokens),), i) for i, (tokens, _) in biased])
            tokens = torch.cat([tokens for _, (tokens, _) in biased])
            biases = torch.cat([b for _, (_, b) in biased])
            idx = (row_ids.to(logits.device), tokens.to(logits.device))
            logits.index_put_(idx, biases.to(logits.device), accumulate=True)

    def _apply_penalties(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> None:
        params = [r.params for r in rows]
        rep = [p.repetition_penalty != 1.0 for p in params]
        freq_pres = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
        if not any(rep) and not any(freq_pres):
            return
        B, V = logits.shape
        dev = logits.device
        counts = _token_counts([r.output_token_ids for r in rows], V, dev)  # [B, V] generated-token counts
        # vLLM's order: repetition first (its sign test reads the raw logit), then frequency and presence
        if any(rep):
            seen = (_token_counts([r.prompt_token_ids for r in rows], V, dev) > 0) | (counts > 0)
            penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None].expand(B, V)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen, scaled, logits))
        if any(freq_pres):
            freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
            pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
            logits -= freq * counts + pres * (counts > 0)

    def _sample(self, logits: torch.Tensor, rows: Seq[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        params = [r.params for r in rows]
        dev = logits.device
        B, V = logits.shape
        temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=dev)
        x = logits / temps[:, None]
        if any(p.min_p > 0 for p in params):  # vLLM's order: before top_k / top_p, whose mass is what min_p kept
            probs = x.softmax(dim=-1)
            min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
            x = x.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))

        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        top_p = [p.top_p for p in params]
        if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_x, order = x.sort(dim=-1, descending=True)
            rank = torch.arange(V, device=dev)[None, :]
            # below the k-th largest logit, not past rank k: tokens tied with the k-th stay (vLLM's, transformers')
            kth = sorted_x.gather(1, torch.tensor(top_k, device=dev)[:, None] - 1)
            drop = sorted_x < kth
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            probs_sorted = sorted_x.softmax(dim=-1)
            # keep the smallest head whose mass reaches top_p, and the first token always: a top_p under float32's
            # smallest (1e-300 passes the API's check) is 0 here, which dropped them all
            past = (probs_sorted.cumsum(dim=-1) - probs_sorted) >= torch.tensor(top_p, device=dev)[:, None]
            drop |= past & (rank > 0)
            x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))

        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs)
        seeded = [i for i, p in enumerate(params) if p.seed is not None and not greedy[i]]
        if not seeded:  # the same draws as filling the unseeded rows from one fresh tensor
            q.exponential_(generator=self.generator)
        elif len(seeded) < B:
            is_seeded = set(seeded)
            unseeded = [i for i in range(B) if i not in is_seeded]
            q[unseeded] = torch.empty((len(unseeded), V), device=dev).exponential_(generator=self.generator)
        gen = self.row_generator
        for i in seeded:  # re-seeding one generator draws what a fresh generator with that seed would
            r = rows[i]
            gen.manual_seed(step_seed(r.params.seed, r.index, r.step))
            q[i].exponential_(generator=gen)
        sampled = (probs / q.clamp_min_(1e-20)).argmax(dim=-1)
        if not any(greedy):
            return sampled
        return torch.where(torch.tensor(greedy, device=dev), logits.argmax(dim=-1), sampled)


def logprob_entry(token: int, logprob: float, top_ids: list[int], top_logprobs: list[float]) -> dict[int, float]:
    """{token: its logprob} and then the top ones (the token is listed once, first, if it is among them)."""
    entry = {token: logprob}
    for t, lp in zip(top_ids, top_logprobs):
        entry.setdefault(t, lp)
    return entry


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float counts of each token id per row (ids >= vocab are ignored)."""
    B = len(token_lists)
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros((B, vocab + 1), device=device)
    if width:
        ids = torch.full((B, width), vocab, dtype=torch.long)
        for i, t in enumerate(token_lists):
            if t:
                ids[i, : len(t)] = torch.tensor(t).clamp_(max=vocab)
        counts.scatter_add_(1, ids.to(device), torch.ones((B, width), device=device))
    return counts[:, :vocab]
