"""Batched decoding with a KV cache: greedy, or temperature / top-p sampling with a seed.

Prompts of different lengths are left-padded into one batch so that every row's next token sits in
the last column. The prompt is run once (prefill) and fills the cache; after that each step feeds
one token per row. Padded slots are marked invalid in the cache, so no row ever attends to them,
and position ids count real tokens only: a row's logits do not depend on how much padding the
batch gave it (tests check them against recomputing each row alone, unpadded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ftcore.model import KVCache


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token if the tokens ranked above it already hold top_p of the mass; the most
        # likely token has nothing above it and always stays
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)  # multinomial renormalises
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """(input_ids (B, L), attention_mask (B, L) bool, True = real token), padding on the left."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p):] = True
    return ids.to(device), mask.to(device)


@dataclass
class Prefill:
    """Prompts run once into a KV cache: what decoding, ranking labels and scoring a reference
    continue from (each rewinds `cache.length` to `length` first)."""
    cache: KVCache
    last_logits: torch.Tensor   # (B, V): the distribution of each prompt's next token
    next_pos: torch.Tensor      # (B, 1): each row's next position (its real tokens so far)
    length: int                 # padded prompt length L


@torch.inference_mode()
def prefill(model, prompts: list[list[int]], pad_id: int, room: int) -> Prefill:
    """Left-padded prompts through the model into a cache with `room` slots after them."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B, L = ids.shape
    cache = model.new_kv_cache(B, L + max(room, 0), device=device)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, position_ids=position_ids, kv_cache=cache, attention_mask=mask, last_only=True)[:, -1]
    return Prefill(cache, logits, mask.sum(-1, keepdim=True), L)


@torch.inference_mode()
def decode_steps(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, start: Prefill | None = None) -> Iterator[tuple[list[int | None], torch.Tensor]]:
    """The decoding loop. Yields once per step (tokens, logits): tokens[b] is row b's new token,
    or None once the row has finished (it produced an eos id earlier); logits (B, V) are what the
    tokens were chosen from. A row's eos token is yielded, and is its last. `start`: the prompts'
    prefill, already run (with room for max_new_tokens - 1 more tokens)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if max_new_tokens <= 0:
        return
    # the last sampled token is never fed back, hence - 1
    p = start or prefill(model, prompts, pad_id, max_new_tokens - 1)
    device = p.last_logits.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    cache, logits, next_pos = p.cache, p.last_logits, p.next_pos
    cache.length = p.length
    finished = torch.zeros(len(logits), dtype=torch.bool, device=device)

    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator)
        # one host sync per step: the tokens are needed on the host anyway (callbacks, stopping)
        tokens = [None if f else t for t, f in zip(tok.tolist(), finished.tolist())]
        yield tokens, logits
        finished |= torch.isin(tok, eos)
        if step == max_new_tokens - 1 or all(t is None or t in eos_ids for t in tokens):
            return
        # finished rows keep decoding (their tokens are dropped): the batch stays rectangular
        logits = model(tok[:, None], position_ids=next_pos, kv_cache=cache)[:, -1]
        next_pos = next_pos + 1


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None, start: Prefill | None = None) -> list[list[int]]:
    """Generated ids per prompt (prompt and eos excluded). Each row stops at its first eos id or
    after max_new_tokens; eos_ids are every id decoding stops at (eos, and for chat prompts the
    template's end-of-turn tokens, ftcore.data.chat). on_token(row, token_id) is called as tokens
    are produced (not for eos)."""
    out: list[list[int]] = [[] for _ in prompts]
    stop = set(eos_ids)
    for tokens, _ in decode_steps(model, prompts, max_new_tokens, eos_ids, pad_id, temperature, top_p, seed, start):
        for row, t in enumerate(tokens):
            if t is None or t in stop:
                continue
            out[row].append(t)
            if on_token is not None:
                on_token(row, t)
    return out


class TextStream:
    """Turns a growing list of token ids into printable text increments. Decoding token by token
    would break multi-byte characters and words whose spacing depends on their neighbours, so it
    decodes everything so far and emits what is new, holding back an incomplete UTF-8 tail (which
    the tokenizer decodes as U+FFFD)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.printed = decode, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed):] if text.startswith(self.printed) else ""
        self.printed = text
        return new

    def finish(self) -> str:
        """Whatever is still held back when generation ends (an incomplete character stays U+FFFD)."""
        text = self.decode(self.ids)
        new = text[len(self.printed):] if text.startswith(self.printed) else ""
        self.printed = text
        return new
