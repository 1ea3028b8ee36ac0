"""A base model from scratch, for machines with no checkpoint to start from (the CPU quickstart).

Trains a byte-level BPE tokenizer and a tiny Llama-family model on raw review text of the training
split (loss on every token, no instructions), then saves it as an HF directory, so the fine-tune
loads it through from_pretrained like any other checkpoint. It takes train.loss and
train.precision ("auto" resolved at the pretraining width); the weights stay fp32, so any bf16
precision means bf16 autocast here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ftcore.config import Config
from ftcore.files import publish_dir, staging_dir, write_atomic
from ftcore.hardware import MatmulShape, resolve_auto
from ftcore.model import Transformer
from ftcore.source import pretrain_model_config
from ftcore.optim import fused_adamw, pretrain_lr_lambda
from ftcore.rundir import INPUTS_FILE
from ftcore.tokenizer import Tokenizer
from ftcore.weights import save_pretrained


def token_stream(texts: list[str], tok: Tokenizer) -> torch.Tensor:
    """Every text as [bos] text [eos], concatenated: the pretraining corpus as one long sequence."""
    out: list[int] = []
    for ids in tok.encode_batch(texts):
        out.append(tok.bos_id)
        out.extend(ids)
        out.append(tok.eos_id)
    return torch.tensor(out, dtype=torch.long)


def pretrain_tokenizer(cfg: Config) -> tuple[Tokenizer, list[str]]:
    """The byte-level BPE tokenizer the base is pretrained with, trained on the texts of the
    training split's records (test reviews never reach the base model), and those texts."""
    from ftcore.data import _PRIVATE, DataError, load_data_records, split_records
    from ftcore.data.reviews import pretraining_texts

    train_records, _, _ = split_records(load_data_records(cfg.data), cfg.data.split, cfg.run.seed)
    p = cfg.pretrain
    for f in p.text_fields:
        if not any(f in r for r in train_records):
            found = ", ".join(sorted({k for r in train_records for k in r} - set(_PRIVATE)))
            raise DataError(f"pretrain.text_fields: no record has a field '{f}' (after data.rename; fields: {found})")
    texts = pretraining_texts(train_records, p.text_fields)
    return Tokenizer.train_bpe(texts, p.vocab_size), texts


def pretrain_base(cfg: Config, out_dir: Path, device: torch.device, inputs: dict) -> Path:
    """Pretrains into out_dir (published whole), with `inputs` (what it is made from: rundir.inputs_record)
    recorded in it."""
    p = cfg.pretrain
    tok, texts = pretrain_tokenizer(cfg)
    stream = token_stream(texts, tok)
    print(f"pretraining a base model: {len(texts)} texts, {len(stream):,} tokens, vocab {tok.vocab_size}", flush=True)

    mcfg = pretrain_model_config(cfg, tok)
    choice = dataclasses.replace(cfg.train)
    for line in resolve_auto(choice, device, MatmulShape.of(p, p.batch_size * p.seq_len)):
        print("pretraining: " + line, flush=True)
    bf16 = choice.precision != "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(cfg.run.seed)
    model = Transformer(mcfg, loss=choice.loss).to(device)
    model.init_weights(seed=cfg.run.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=fused_adamw(cfg, device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, pretrain_lr_lambda(p.steps))

    g = torch.Generator().manual_seed(cfg.run.seed)
    n_windows = len(stream) - p.seq_len - 1
    bar = tqdm(range(p.steps), desc="pretrain", dynamic_ncols=True, disable=not cfg.log.progress)
    for _ in bar:
        starts = torch.randint(0, n_windows, (p.batch_size,), generator=g)
        window = torch.stack([stream[s:s + p.seq_len + 1] for s in starts.tolist()]).to(device)
        with autocast:
            loss_sum, n = model(window[:, :-1], labels=window[:, 1:])
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if cfg.log.progress:
            bar.set_postfix(loss=f"{loss.item():.3f}")  # the only sync of the step, for the bar

    tmp = staging_dir(out_dir)
    save_pretrained(model, tmp, tokenizer=tok)
    # what it was made from, inside the directory before it is published: a later run in this run
    # directory reuses it only if its inputs match (ftcore.rundir.check_cached_base)
    write_atomic(tmp / INPUTS_FILE, json.dumps(inputs, indent=2) + "\n")
    publish_dir(tmp, out_dir)
    return out_dir
