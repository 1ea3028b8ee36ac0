"""Batching: which examples form an optimizer step (StepSampler: a pure function of seed and
step), how a global batch is split across ranks and micro-batches, and collation (pad, bucket,
pack) into shifted, padded tensors."""
from __future__ import annotations

import math

import numpy as np
import torch

from ftcore.data.examples import Example
from ftcore.model import IGNORE_INDEX
from ftcore.data.records import DataError


def padding_share(lengths: list[int], mode: str, micro_batch_size: int, global_batch_size: int,
                  max_seq_len: int, seed: int = 0, max_steps: int = 200) -> float:
    """Share of padding tokens in the collated micro-batches of the first epoch (at most max_steps
    steps), as StepSampler + micro_batches would build them on one process."""
    if not lengths:
        return 0.0
    sampler = StepSampler(len(lengths), global_batch_size, seed)
    steps = min(math.ceil(len(lengths) / global_batch_size), max_steps)
    real = total = 0
    for step in range(steps):
        batch = [lengths[i] for i in sampler.indices(step)]
        if mode == "bucket":
            batch.sort(reverse=True)
        for g in range(0, len(batch), micro_batch_size):
            group = batch[g:g + micro_batch_size]
            rows = [[group[i] for i in row] for row in pack_rows(group, max_seq_len)] if mode == "pack" \
                else [[n] for n in group]
            real += sum(group)
            total += len(rows) * max(sum(row) for row in rows)
    return 1.0 - real / total


# ----------------------------------------------------------------------------------------------
# batching: which examples form a step (StepSampler), how they are split and collated

class StepSampler:
    """The global batch of optimizer step `step` is a pure function of (seed, step): the stream of
    epoch-wise seeded permutations of range(num_examples), cut into global_batch_size slices (a
    batch may straddle two epochs). Nothing depends on rank or world size; the position to save
    in a checkpoint is the step counter."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int = 0):
        if num_examples <= 0:
            raise DataError("StepSampler: no examples to sample from")
        if global_batch_size <= 0:
            raise DataError(f"StepSampler: global_batch_size must be positive, got {global_batch_size}")
        self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
        self.step = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n, start = self.num_examples, step * self.global_batch_size
        return [int(self._perm(k // n)[k % n]) for k in range(start, start + self.global_batch_size)]

    def epoch(self, step: int | None = None) -> float:
        return (self.step if step is None else step) * self.global_batch_size / self.num_examples

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        idx = self.indices(self.step)
        self.step += 1
        return idx

    def seek(self, step: int) -> None:
        """The data position a checkpoint records: the next step to draw."""
        self.step = step

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "num_examples": self.num_examples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_examples", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"checkpoint data position is for {key}={state[key]}, this run has "
                                f"{getattr(self, key)}: the data or batch settings changed since the checkpoint")
        self.step = int(state["step"])


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths`, grouped into rows of total <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise DataError(f"example of {lengths[i]} tokens does not fit max_seq_len={capacity}")
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate(examples: list[Example], *, mode: str = "pad", pad_id: int = 0,
            max_seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch. pad/bucket: a row per example, right-padded to the longest. pack: examples
    first-fit-decreasing into rows of <= max_seq_len; position_ids restart at 0 per example and
    doc_ids number the examples of a row (padding -1) for the model's document-causal mask.
    labels are shifted: labels[b, t] is the target of position t; an example's last position,
    prompt and padding are -100, so no target ever crosses into the next packed example."""
    if mode not in ("pad", "bucket", "pack"):
        raise DataError(f"data.batching must be pad, bucket or pack, got {mode!r}")
    if not examples:
        raise DataError("collate: empty micro-batch")
    if mode == "pack":
        if max_seq_len is None:
            raise DataError("collate: pack mode needs max_seq_len")
        rows = [[examples[i] for i in row] for row in pack_rows([len(e) for e in examples], max_seq_len)]
    else:
        rows = [[e] for e in examples]
    return _batch([[(e.input_ids, e.labels) for e in row] for row in rows], pad_id, pack=mode == "pack")


def pad_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(input_ids, unshifted labels) pairs, a row each, right-padded: collate's pad mode for
    sequences that are not Examples (evaluation's k-shot contexts)."""
    return _batch([[s] for s in seqs], pad_id, pack=False)


def _batch(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, pack: bool) -> dict[str, torch.Tensor]:
    T = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids, labels, position_ids, doc_ids = [], [], [], []
    for row in rows:
        ids, lab, pos, doc = [], [], [], []
        for doc_index, (row_ids, row_labels) in enumerate(row):
            ids += row_ids
            lab += row_labels[1:] + [IGNORE_INDEX]
            pos += range(len(row_ids))
            doc += [doc_index] * len(row_ids)
        pad = T - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        # padding: positions continue in pad mode; in pack mode padding is a "document" of its own
        position_ids.append(pos + (list(range(pad)) if pack else list(range(len(pos), T))))
        doc_ids.append(doc + [-1] * pad)
    batch = {"input_ids": torch.tensor(input_ids, dtype=torch.long),
             "labels": torch.tensor(labels, dtype=torch.long),
             "position_ids": torch.tensor(position_ids, dtype=torch.long)}
    if pack:
        batch["doc_ids"] = torch.tensor(doc_ids, dtype=torch.long)
    return batch


def order_for_batching(examples: list[Example], mode: str) -> list[Example]:
    """bucket: the global batch sorted by length (longest first, ties by position), so each
    micro-batch holds similar lengths; pad and pack: as sampled."""
    if mode == "bucket":
        return [examples[i] for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))]
    return list(examples)


def micro_batches(examples: list[Example], micro_batch_size: int, *, accum_steps: int, rank: int = 0,
                  world_size: int = 1, mode: str = "pad", pad_id: int = 0,
                  max_seq_len: int | None = None) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one global batch. The batch is ordered (bucket) and cut into
    accum_steps * world_size groups of micro_batch_size examples: group g = examples
    [g*m, (g+1)*m), rank r takes groups r*accum_steps ... (r+1)*accum_steps - 1. Every group is
    the same on 1 or N processes, so the step's loss is too."""
    n_groups = accum_steps * world_size
    if len(examples) != n_groups * micro_batch_size:
        raise DataError(f"global batch of {len(examples)} examples != micro_batch_size {micro_batch_size} "
                        f"x accumulation steps {accum_steps} x world size {world_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    ordered = order_for_batching(examples, mode)
    m = micro_batch_size
    return [collate(ordered[g * m:(g + 1) * m], mode=mode, pad_id=pad_id, max_seq_len=max_seq_len)
            for g in range(rank * accum_steps, (rank + 1) * accum_steps)]
