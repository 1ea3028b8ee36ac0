"""Scoring one model on a list of examples: per task, one prefill per prompt, from which the
teacher-forced loss of the reference, the ranked labels and the greedy answer all continue;
k-shot prompts; the label sets. The runs that load models and write reports are in
ftcore.evaluation (the package's __init__)."""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from ftcore.data.batching import pad_batch
from ftcore.data.examples import group_by_task, tokenize_examples
from ftcore.data.rendering import Rendered
from ftcore.evaluation.metrics import classification_metrics, generation_metrics, natural_order, normalize_label
from ftcore.model import IGNORE_INDEX

MAX_RANKED_LABELS = 64  # a "classification" task with more distinct answers is not ranked

# ---------------------------------------------------------------------------------------------
# teacher-forced completion loss

def _loss_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded batch for teacher forcing. Padding goes on the right so every real token keeps
    positions 0.. and, under the causal mask, never sees a pad; labels are shifted here (target of
    position t = token t+1) and -100 on prompt and padding."""
    batch = pad_batch(seqs, pad_id)
    return batch["input_ids"].to(device), batch["labels"].to(device)


@torch.inference_mode()
def _loss_sum(model, seqs, pad_id: int, batch_size: int, device, bar=None) -> tuple[float, int]:
    # summed on the device in float64, read once at the end: no host sync per batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths: less padding
    for s in range(0, len(order), batch_size):
        input_ids, targets = _loss_batch([seqs[i] for i in order[s:s + batch_size]], pad_id, device)
        loss_sum, n = model(input_ids, labels=targets)
        total += loss_sum.double()
        count += n
        if bar is not None:
            bar.update(1)
    return total.item(), int(count.item())


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def completion_loss(model, examples, pad_id: int, batch_size: int, device) -> tuple[float, float, int]:
    """(mean loss, perplexity, n_tokens) over the completion tokens of `examples`, teacher forced.
    The mean weights every token equally (sum of token losses / token count, never a mean of
    per-example means) and perplexity = exp(that mean)."""
    total, n = _loss_sum(model, [(e.input_ids, e.labels) for e in examples], pad_id, batch_size, device)
    loss = total / n if n else float("nan")
    return loss, _perplexity(loss), n


# ---------------------------------------------------------------------------------------------
# label sets and rank classification

@dataclass
class LabelSet:
    """A classification task's answers: normalised names (what metrics compare), the completion
    text and token ids each is written as (its most common form in the examples it came from)."""
    names: list[str]
    texts: list[str]
    ids: list[list[int]]


def label_sets(examples) -> dict[str, LabelSet]:
    """{task: LabelSet} of the classification examples' completions, per task (held-out paraphrases
    share their task's labels); a label's ids are its answer tokens, without end-of-turn or eos.
    A task whose template has answer_choices has those as its labels, in their order (the ones some
    example writes); where they differ between records there is no one label set, and the task is
    left out, as are tasks with more than MAX_RANKED_LABELS labels."""
    forms: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    choices: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for ex in examples:
        name = normalize_label(ex.completion)
        if ex.kind != "classification" or not name:
            continue
        if ex.choices:
            names = tuple(dict.fromkeys(normalize_label(c) for c in ex.choices))
            choices[ex.task].add(names)
            if name not in names:
                continue  # an answer outside the template's choices is not a label
        if ids := ex.answer_ids:
            forms[ex.task][name][(ex.completion, tuple(ids))] += 1
    out = {}
    for task, by_name in forms.items():
        if len(choices.get(task, ())) > 1 or len(by_name) > MAX_RANKED_LABELS:
            continue
        names = [n for n in next(iter(choices[task])) if n in by_name] if task in choices \
            else sorted(by_name, key=natural_order)
        best = [by_name[n].most_common(1)[0][0] for n in names]
        out[task] = LabelSet(names, [t for t, _ in best], [list(i) for _, i in best])
    return out


@torch.inference_mode()
def continuation_logprobs(model, start, continuations: list[list[int]]) -> torch.Tensor:
    """(B,) float64: log P(continuations[b] | prompt b), summed over its tokens, continuing from
    the prompts' prefill (ftcore.generate.prefill; its cache is rewound first): the first token is
    scored by the prefill's last logits, the rest by one forward of the continuations, right-padded
    (each row's padding comes after its tokens, so it changes nothing they attend to)."""
    cache, B = start.cache, len(continuations)
    cache.length = start.length
    device = start.last_logits.device
    first = start.last_logits.float().log_softmax(-1)
    rows = torch.arange(B, device=device)
    score = first[rows, torch.tensor([c[0] for c in continuations], device=device)].double()
    rest = max(len(c) for c in continuations) - 1
    if rest > 0:
        feed = torch.zeros((B, rest), dtype=torch.long)
        target = torch.zeros((B, rest), dtype=torch.long)
        valid = torch.zeros((B, rest), dtype=torch.bool)
        for b, c in enumerate(continuations):
            n = len(c) - 1
            feed[b, :n], target[b, :n], valid[b, :n] = torch.tensor(c[:-1]), torch.tensor(c[1:]), True
        feed, target, valid = feed.to(device), target.to(device), valid.to(device)
        logits = model(feed, kv_cache=cache, attention_mask=valid,
                       position_ids=start.next_pos + torch.arange(rest, device=device))
        for b in range(0, B, 8):  # a few rows at a time: (rows, tokens, vocab) in fp32 is large
            lp = logits[b:b + 8].float().log_softmax(-1).gather(-1, target[b:b + 8, :, None]).squeeze(-1)
            score[b:b + 8] += (lp * valid[b:b + 8]).double().sum(-1)
    return score


@torch.inference_mode()
def label_logprobs(model, prompts: list[list[int]], candidates: list[list[int]], pad_id: int,
                   batch_size: int, bar=None) -> torch.Tensor:
    """(len(prompts), len(candidates)) float64: log P(candidate tokens | prompt) under the model,
    summed over the candidate's tokens. Each batch of prompts is run once into a KV cache; every
    candidate then continues from it, so a candidate of n tokens costs n - 1 extra positions, and a
    one-token candidate none."""
    from ftcore.generate import prefill
    longest = max(len(c) for c in candidates)
    out = torch.empty(len(prompts), len(candidates), dtype=torch.float64)
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        start = prefill(model, batch, pad_id, longest - 1)
        for c, cand in enumerate(candidates):
            out[s:s + len(batch), c] = continuation_logprobs(model, start, [cand] * len(batch)).cpu()
        if bar is not None:
            bar.update(1)
    return out


def rank_classify(model, prompts: list[list[int]], label_set: LabelSet, pad_id: int, batch_size: int,
                  bar=None) -> list[str]:
    """The most likely label (its normalised name) after each prompt."""
    scores = label_logprobs(model, prompts, label_set.ids, pad_id, batch_size, bar)
    return [label_set.names[i] for i in scores.argmax(-1).tolist()]


# ---------------------------------------------------------------------------------------------
# evaluating one model on every task

class _ShotBuilder:
    """k-shot prompts: up to k solved examples of the same task (prompt + completion, from the
    training split) before the test example, separated by a blank line; in a chat template, as
    earlier user and assistant turns of the conversation, rendered by the template (its system turn
    once, each turn ended as the template ends it).

    The shots must fit the context the model was trained on (`max_len`) together with the test
    example and the room its answer needs: candidates are drawn in a seeded random order and taken
    while they fit, so a long test prompt gets shorter or fewer shots; how many it got is returned,
    and the report says when it was fewer than k. Plain prompts: the test example's own tokens stay
    exactly as in zero-shot (only its bos moves to the front), so the difference between the two
    measures the context alone. The loss is also computed with the shots in context (on the test
    completion only)."""

    def __init__(self, tokenizer, pool, k: int, max_len: int, seed: int, chat=None):
        self.k, self.max_len, self.rng = k, max_len, random.Random(seed)
        self.tokenizer, self.chat = tokenizer, chat
        self.bos = tokenizer.bos_id
        self.eos = set(tokenizer.eos_ids)
        self.sep = tokenizer.encode("\n\n")
        self.pool: dict[str, list] = defaultdict(list)
        for ex in pool:
            self.pool[ex.template].append(ex)

    def _head_len(self, ex) -> int:
        """Leading tokens of `ex` that stay in front of the shots (bos)."""
        return ex.context_len or int(self.bos is not None and ex.input_ids[:1] == [self.bos])

    def _body(self, shot) -> list[int]:
        ids = shot.input_ids[self._head_len(shot):]
        if ids and ids[-1] in self.eos:
            ids = ids[:-1]
        return ids + self.sep

    def __call__(self, ex, room_for_new: int) -> tuple[list[int], list[int], int, int]:
        """(input_ids, labels, prompt_len, shots used) of `ex` with up to k shots in front."""
        # held-out paraphrases ("rating@heldout1") have no training examples of their own unless the
        # pool was rendered with them too: fall back to the training template's examples
        pool = self.pool.get(ex.template) or self.pool.get(ex.task, [])
        # a bounded seeded draw, so a large pool costs no more than a small one
        drawn = [s for s in self.rng.sample(pool, min(len(pool), 8 * self.k)) if s.record_id != ex.record_id]
        if ex.messages is not None and self.chat is not None:
            return self._conversation(ex, drawn, room_for_new)
        n_head = self._head_len(ex)
        head, ids, labels = ex.input_ids[:n_head], ex.input_ids[n_head:], ex.labels[n_head:]
        room = self.max_len - len(head) - len(ids) - room_for_new
        bodies = []
        for shot in drawn:
            if len(bodies) == self.k:
                break
            body = self._body(shot)
            if len(body) <= room:
                bodies.append(body)
                room -= len(body)
        context = head + [t for b in bodies for t in b]
        return (context + ids, [IGNORE_INDEX] * len(context) + labels,
                len(context) + ex.prompt_len - n_head, len(bodies))

    def _conversation(self, ex, drawn, room_for_new: int) -> tuple[list[int], list[int], int, int]:
        """The shots' turns between ex's system turn and its own turns, the whole conversation
        rendered by the chat template and tokenized as training tokenizes it (loss on ex's answer)."""
        system = [m for m in ex.messages if m["role"] == "system"]
        own = [m for m in ex.messages if m["role"] != "system"]
        best, turns, used = (ex.input_ids, ex.labels, ex.prompt_len), [], 0
        for shot in drawn:
            if used == self.k:
                break
            if shot.messages is None:
                continue
            trial = turns + [m for m in shot.messages if m["role"] != "system"]
            messages = system + trial + own
            rendered = Rendered.conversation(self.chat.conversation(messages, "last_assistant"), messages, ex.record_id,
                                             ex.template, ex.kind)
            (tokenized,) = tokenize_examples([rendered], self.tokenizer, max_seq_len=1 << 30)
            if len(tokenized) + room_for_new <= self.max_len:
                best, turns, used = (tokenized.input_ids, tokenized.labels, tokenized.prompt_len), trial, used + 1
        return (*best, used)


@torch.inference_mode()
def _answer(model, prompts: list[list[int]], references: list[list[int]], label_set, new_tokens: int,
            tokenizer, stop_ids: list[int], batch_size: int, bar=None):
    """(loss sum, target tokens, greedy answers, ranked labels or None) for prompts of one task:
    each batch of prompts runs through the model once (one prefill), and the reference
    completion's loss, the label ranking and the greedy answer all continue from its cache.
    Batches of similar prompt length waste less compute on padding; results go back in order.
    Decoding stops at any of stop_ids (eos, and a chat template's end-of-turn tokens)."""
    from ftcore.generate import generate, prefill
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    ranked: list[int] = [0] * len(prompts)
    total, count = 0.0, 0
    longest_label = max((len(c) for c in label_set.ids), default=1) if label_set else 1
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch, refs = [prompts[i] for i in idx], [references[i] for i in idx]
        room = max(new_tokens - 1, max(len(r) for r in refs) - 1, longest_label - 1)
        start = prefill(model, batch, tokenizer.pad_id, room)
        scored = [i for i, r in enumerate(refs) if r]
        if scored:
            lp = continuation_logprobs(model, start, [refs[i] if refs[i] else [0] for i in range(len(refs))])
            total -= float(lp[scored].sum())
            count += sum(len(refs[i]) for i in scored)
        if label_set is not None:
            scores = torch.stack([continuation_logprobs(model, start, [cand] * len(batch)) for cand in label_set.ids], -1)
            for i, best in zip(idx, scores.argmax(-1).tolist()):
                ranked[i] = best
        for i, ids in zip(idx, generate(model, batch, new_tokens, stop_ids, tokenizer.pad_id, start=start)):
            answers[i] = ids
        if bar is not None:
            bar.update(1)
    return total, count, answers, ([label_set.names[r] for r in ranked] if label_set is not None else None)


# an answer longer than the longest label by more than a few tokens (a space, a newline, a full
# stop) cannot normalise to a label: decoding further only costs time
_LABEL_SLACK_TOKENS = 4


def evaluate_model(model, tokenizer, examples, eval_cfg, device, shots_pool=None,
                   outputs: dict | None = None, seed: int = 0, progress: bool = True,
                   label_pool=None, context_len: int | None = None, chat=None) -> dict[str, dict]:
    """{task: {metric: value}} for one model. Per task (= template): loss and perplexity of the
    completions (teacher forced), the mean prompt length in tokens, the kind's metrics on greedy
    outputs, and for classification the rank_* metrics over the task's label set, taken from
    `label_pool` (the training split; default: `examples`). With shots_pool and eval_cfg.shots =
    k > 0, every prompt gets up to k in-context examples from the pool, fitted into context_len
    (default: the model's max_position_embeddings); `shots` is then the mean number used. chat:
    the ChatTemplate chat examples were rendered in (their k-shot turns are rendered by it, and
    decoding stops at its end-of-turn tokens as at eos). If `outputs` is a dict, it receives
    {task: [{"prompt", "reference", "output"}]}."""
    from tqdm import tqdm

    tasks = group_by_task(examples, eval_cfg.max_examples, eval_cfg.max_heldout_examples)
    labels = label_sets(label_pool if label_pool is not None else examples)
    stop_ids = list(dict.fromkeys(tokenizer.eos_ids + (chat.stop_ids if chat is not None else [])))
    bs, max_new = eval_cfg.batch_size, eval_cfg.max_new_tokens
    shots = None
    if shots_pool is not None and eval_cfg.shots > 0:
        shots = _ShotBuilder(tokenizer, shots_pool, eval_cfg.shots,
                             context_len or model.config.max_position_embeddings, seed, chat)
    n_batches = sum(math.ceil(len(exs) / bs) for exs in tasks.values())
    bar = tqdm(total=n_batches, desc="eval" + (f" {eval_cfg.shots}-shot" if shots else ""),
               unit="batch", disable=not progress)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task, exs in tasks.items():
            kinds = {e.kind for e in exs}
            if len(kinds) != 1:
                raise ValueError(f"task {task!r} mixes kinds {sorted(kinds)}")
            kind = kinds.pop()
            label_set = labels.get(exs[0].task) if kind == "classification" else None
            new_tokens = max_new if label_set is None else \
                min(max_new, max(map(len, label_set.ids)) + _LABEL_SLACK_TOKENS)
            seqs = [shots(e, new_tokens) if shots else (e.input_ids, e.labels, e.prompt_len, 0) for e in exs]
            # the prompt as data.py cut it to fit (bos included, and the shots in k-shot); the
            # reference completion is what carries loss after it
            prompts = [ids[:prompt_len] for ids, _, prompt_len, _ in seqs]
            references = [[t for t, lab in zip(ids[n:], labs[n:]) if lab != IGNORE_INDEX] for ids, labs, n, _ in seqs]
            total, n, generated, ranked = _answer(model, prompts, references, label_set, new_tokens, tokenizer, stop_ids, bs, bar)
            predictions = [tokenizer.decode(g) for g in generated]
            references_text = [e.completion for e in exs]
            loss = total / n if n else float("nan")
            m = generation_metrics(kind, predictions, references_text, label_set.names if label_set else None)
            if label_set is not None:
                r = classification_metrics(ranked, references_text, label_set.names)
                m.update(rank_accuracy=r["accuracy"], rank_macro_f1=r["macro_f1"], label_set=label_set.names)
            m.update(loss=loss, perplexity=_perplexity(loss),
                     prompt_tokens=sum(map(len, prompts)) / len(prompts),  # the price of k shots
                     examples=len(exs))
            if shots:
                used = [k for *_, k in seqs]
                m.update(shots=sum(used) / len(used),
                         short_of_shots=sum(k < eval_cfg.shots for k in used) / len(used))
            results[task] = m
            if outputs is not None:
                outputs[task] = [{"prompt": e.prompt, "reference": e.completion, "output": p,
                                  **({"ranked": ranked[i]} if ranked is not None else {})}
                                 for i, (e, p) in enumerate(zip(exs, predictions))]
    finally:
        bar.close()
        model.train(was_training)
    return results


