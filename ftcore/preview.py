"""`ftcore preview CONFIG`: the first examples of a split as training and evaluation see them, the
whole text (in the chat template, when there is one) with the tokens that carry loss marked, or
as JSON lines (text, input_ids, labels). Only the tokenizer is needed, never a model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ftcore.config import Config
from ftcore.data import prepare_datasets
from ftcore.model import IGNORE_INDEX
from ftcore.rundir import BASE_INPUTS, check_cached_base, inputs_record
from ftcore.source import check_source, load_tokenizer
from ftcore.tokenizer import Tokenizer

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"  # around the text that carries loss


def preview_tokenizer(cfg: Config) -> Tokenizer:
    """model.path's tokenizer; without model.path, that of the base pretraining wrote to RUN_DIR/base
    (if made from this config's inputs, as `ftcore train` would reuse it), or, before there is one, the BPE tokenizer pretraining will train (the same texts, trained here,
    with no model)."""
    if cfg.model.path:
        return load_tokenizer(check_source(cfg.model.path, "model.path"))
    base = Path(cfg.run.dir) / "base"
    if check_cached_base(Path(cfg.run.dir), inputs_record(cfg, BASE_INPUTS)):  # a base of other inputs: refused
        return load_tokenizer(base)
    from ftcore.pretrain import pretrain_tokenizer
    print(f"preview: no model.path and no {base} yet: training the tokenizer pretraining would train "
          "(no model)", file=sys.stderr)
    return pretrain_tokenizer(cfg)[0]


def marked_text(tokenizer: Tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The decoded tokens with each run of tokens that carry loss between ⟦ and ⟧."""
    out, start = [], 0
    for t in range(1, len(input_ids) + 1):
        if t == len(input_ids) or (labels[t] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:t], skip_special_tokens=False)
            out.append(text if labels[start] == IGNORE_INDEX else LOSS_OPEN + text + LOSS_CLOSE)
            start = t
    return "".join(out)


def preview(cfg: Config, split: str = "train", n: int = 3, as_json: bool = False, out=None) -> int:
    """Writes the first n examples of `split` to out (stdout); returns how many there were."""
    out = out or sys.stdout
    tokenizer = preview_tokenizer(cfg)
    datasets = prepare_datasets(cfg.data, tokenizer, seed=cfg.run.seed)
    examples = datasets.split(split)[:n]
    if not as_json:
        prompts = datasets.stats["chat_template"] if datasets.stats["prompt_format"] == "chat" else "plain prompts"
        out.write(f"{split}: {len(examples)} of {len(datasets.split(split)):,} examples; {prompts}; "
                  f"loss on the text between {LOSS_OPEN} and {LOSS_CLOSE}\n")
    for i, ex in enumerate(examples):
        if as_json:
            out.write(json.dumps({"text": tokenizer.decode(ex.input_ids, skip_special_tokens=False),
                                  "input_ids": ex.input_ids, "labels": ex.labels, "template": ex.template,
                                  "record_id": ex.record_id}, ensure_ascii=False) + "\n")
            continue
        out.write(f"\n--- {i + 1}: record {ex.record_id}, template {ex.template}, {len(ex)} tokens, "
                  f"{ex.num_targets} with loss{', truncated' if ex.truncated else ''}\n")
        out.write(marked_text(tokenizer, ex.input_ids, ex.labels) + "\n")
    return len(examples)
