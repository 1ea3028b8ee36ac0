"""Evaluation: how much better than the base model is the fine-tuned one?

Metrics (written here, no runtime dependency; tests check them against the reference libraries):
  rouge()  ROUGE-1/2/L F1 as Google's `rouge-score` computes them (its default tokenizer, no stemming)
  bleu()   corpus BLEU as `sacrebleu.corpus_bleu` computes it by default (13a tokenizer, exp smoothing)

The driver evaluates a model per task (= template name, held-out paraphrases included): completion
loss / perplexity (teacher forced, completion tokens only) for every task, plus a generation metric
on greedy outputs that depends on the task's kind: accuracy of the normalised label
(classification), ROUGE (summarization), BLEU and ROUGE-L (generation, translation). The base model
is also evaluated k-shot (eval.shots solved training examples in the prompt). `write_report` turns
the sections base / base_kshot / finetuned into eval.json and a markdown table.

    evaluate_model    one model, a list of examples -> {task: {metric: value}}
    evaluate_for_run  load a model directory, evaluate it as base (+ k-shot) or fine-tuned
    run_eval          `ftcore eval CONFIG --model BASE_DIR --model FINETUNED_DIR`
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import string
from collections import Counter, defaultdict
from pathlib import Path

import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)

# ---------------------------------------------------------------------------------------------
# ROUGE, as rouge-score computes it

# rouge-score's default tokenizer: lowercase, every run of characters outside [a-z0-9] becomes a
# space, split. (Non-ASCII letters are therefore separators, as in the original ROUGE-1.5.5.)
_ROUGE_SEPARATORS = re.compile(r"[^a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return _ROUGE_SEPARATORS.sub(" ", text.lower()).split()


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _rouge_n(ref: list[str], hyp: list[str], n: int) -> float:
    r, h = _ngrams(ref, n), _ngrams(hyp, n)
    overlap = sum((r & h).values())  # clipped counts: min(count in ref, count in hyp) per n-gram
    # max(.., 1): an empty side gives precision/recall 0 rather than a division by zero
    return _f1(overlap / max(sum(h.values()), 1), overlap / max(sum(r.values()), 1))


def _lcs_length(a: list[str], b: list[str]) -> int:
    # one row of the classic dynamic programme at a time: O(len(a)·len(b)) time, O(len(b)) memory
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(ref: list[str], hyp: list[str]) -> float:
    if not ref or not hyp:
        return 0.0
    lcs = _lcs_length(ref, hyp)
    return _f1(lcs / len(hyp), lcs / len(ref))


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean over pairs of each pair's ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1), no stemming."""
    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions vs {len(references)} references")
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        p, r = _rouge_tokens(pred), _rouge_tokens(ref)
        totals["rouge1"] += _rouge_n(r, p, 1)
        totals["rouge2"] += _rouge_n(r, p, 2)
        totals["rougeL"] += _rouge_l(r, p)
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# BLEU, as sacrebleu computes it by default

# sacrebleu's "13a" tokenizer (mteval-v13a.pl, the WMT standard), applied in this order:
_BLEU_RULES = [
    # most ASCII punctuation and symbols become separate tokens ({|}~ [\]^_` space-& (-+ :-@ /)
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    # period and comma are split off unless they sit between digits (3.14, 1,000 stay whole)
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    # a dash after a digit is split off (2-3 -> 2 - 3)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def _bleu_tokens(line: str) -> list[str]:
    line = line.rstrip()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:  # undo the XML escapes mteval's input format used
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "  # the rules look at the characters around punctuation: pad both ends
    for pattern, repl in _BLEU_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def bleu(predictions: list[str], references: list[str], max_order: int = 4) -> float:
    """Corpus BLEU (0-100) with one reference per prediction: sacrebleu's default definition
    (13a tokenizer, case-sensitive, 'exp' smoothing, brevity penalty over the whole corpus)."""
    if len(predictions) != len(references):
        raise ValueError(f"bleu: {len(predictions)} predictions vs {len(references)} references")
    correct, total = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        h, r = _bleu_tokens(pred), _bleu_tokens(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_order + 1):
            hn, rn = _ngrams(h, n), _ngrams(r, n)
            total[n - 1] += sum(hn.values())
            correct[n - 1] += sum((hn & rn).values())
    if not any(correct):
        return 0.0
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    # 'exp' smoothing (NIST / mteval): the k-th order with no match counts as 1 / (2^k · total)
    precisions, smooth = [0.0] * max_order, 1.0
    for n in range(max_order):
        if total[n] == 0:  # hypotheses too short for this order: precision stays 0, BLEU is 0
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if min(precisions) == 0.0:
        return 0.0
    return bp * math.exp(sum(math.log(p) for p in precisions) / max_order)


# ---------------------------------------------------------------------------------------------
# teacher-forced completion loss

def _loss_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded batch for teacher forcing. Padding goes on the right so every real token keeps
    positions 0.. and, under the causal mask, never sees a pad; labels are shifted here (target of
    position t = token t+1) and -100 on prompt and padding."""
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        targets[i, :len(ids) - 1] = torch.tensor(labels[1:])
    return input_ids.to(device), targets.to(device)


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
# generation metrics

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_label(text: str) -> str:
    """A classification answer as compared: its first non-empty line, lowercased, without
    punctuation, whitespace collapsed (' Positive.' == 'positive')."""
    line = text.strip().split("\n", 1)[0]
    return " ".join(line.lower().translate(_PUNCT).split())


def accuracy(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def generation_metrics(kind: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    predictions = [p.strip() for p in predictions]
    references = [r.strip() for r in references]
    if kind == "classification":
        return {"accuracy": accuracy(predictions, references)}
    if kind == "summarization":
        return rouge(predictions, references)
    if kind in ("generation", "translation"):
        return {"bleu": bleu(predictions, references), "rougeL": rouge(predictions, references)["rougeL"]}
    raise ValueError(f"unknown task kind {kind!r} (classification | generation | summarization | translation)")


# ---------------------------------------------------------------------------------------------
# evaluating one model on every task

def group_by_task(examples, max_examples: int = 0) -> dict[str, list]:
    """Examples per task (template name, in order of first appearance), at most max_examples each."""
    tasks: dict[str, list] = {}
    for ex in examples:
        group = tasks.setdefault(ex.template, [])
        if not max_examples or len(group) < max_examples:
            group.append(ex)
    return tasks


class _ShotBuilder:
    """k-shot prompts: k solved examples of the same task (prompt + completion, drawn with a seeded
    RNG from the training split) before the test example, separated by a blank line.

    The test example's own tokens stay exactly as in zero-shot (only its bos moves to the front), so
    the difference between the two measures the context alone. The loss is also computed with the
    shots in context (still on the test completion only): in-context learning lowers it too."""

    def __init__(self, tokenizer, pool, k: int, max_len: int, seed: int):
        self.k, self.max_len, self.rng = k, max_len, random.Random(seed)
        self.bos = tokenizer.bos_id
        self.eos = set(tokenizer.eos_ids)
        self.sep = tokenizer.encode("\n\n")
        self.pool: dict[str, list] = defaultdict(list)
        for ex in pool:
            self.pool[ex.template].append(ex)

    def _strip(self, ids: list[int]) -> list[int]:
        start = 1 if self.bos is not None and ids[:1] == [self.bos] else 0
        end = len(ids) - 1 if ids and ids[-1] in self.eos else len(ids)
        return ids[start:end]

    def __call__(self, ex, room_for_new: int) -> tuple[list[int], list[int], int]:
        """(input_ids, labels, prompt_len) of `ex` with up to k shots in front."""
        # held-out paraphrases ("rating@heldout1") have no training examples of their own unless the
        # pool was rendered with them too: fall back to the training template's examples
        candidates = [s for s in (self.pool.get(ex.template) or self.pool.get(ex.template.split("@")[0], []))
                      if s.record_id != ex.record_id]
        shots = self.rng.sample(candidates, min(self.k, len(candidates)))
        has_bos = self.bos is not None and ex.input_ids[:1] == [self.bos]
        head, ids, labels = [self.bos] if has_bos else [], ex.input_ids[int(has_bos):], ex.labels[int(has_bos):]
        bodies = [self._strip(s.input_ids) + self.sep for s in shots]
        # drop shots while the whole sequence would not fit the model's positions
        while bodies and len(head) + sum(map(len, bodies)) + len(ids) + room_for_new > self.max_len:
            bodies.pop()
        context = head + [t for b in bodies for t in b]
        return context + ids, [IGNORE_INDEX] * len(context) + labels, len(context) + ex.prompt_len - int(has_bos)


def _generate_batched(model, prompts, max_new_tokens, eos_ids, pad_id, batch_size, bar=None):
    from ftcore.generate import generate
    # batches of similar prompt length waste less compute on padding; results go back in order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, ids in zip(idx, generate(model, [prompts[i] for i in idx], max_new_tokens, eos_ids, pad_id)):
            out[i] = ids
        if bar is not None:
            bar.update(1)
    return out


def evaluate_model(model, tokenizer, examples, eval_cfg, device, shots_pool=None,
                   outputs: dict | None = None, seed: int = 0, progress: bool = True) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for one model. Per task (= template): loss and perplexity of the
    completions (teacher forced), the mean prompt length in tokens, and the kind's generation
    metric on greedy outputs. With shots_pool and eval_cfg.shots = k > 0, every prompt gets k
    in-context examples from the pool (the k-shot baseline). If `outputs` is a dict, it receives
    {task: [{"prompt", "reference", "output"}]} for the report's side-by-side samples."""
    from tqdm import tqdm

    tasks = group_by_task(examples, eval_cfg.max_examples)
    bs, max_new = eval_cfg.batch_size, eval_cfg.max_new_tokens
    shots = None
    if shots_pool is not None and eval_cfg.shots > 0:
        shots = _ShotBuilder(tokenizer, shots_pool, eval_cfg.shots, model.config.max_position_embeddings, seed)
    n_batches = sum(2 * math.ceil(len(exs) / bs) for exs in tasks.values())  # loss + generation
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
            seqs = [shots(e, max_new) if shots else (e.input_ids, e.labels, e.prompt_len) for e in exs]
            total, n = _loss_sum(model, [(ids, labels) for ids, labels, _ in seqs], tokenizer.pad_id, bs, device, bar)
            # the prompt as data.py cut it to fit (bos included, and the shots in k-shot)
            prompts = [ids[:prompt_len] for ids, _, prompt_len in seqs]
            generated = _generate_batched(model, prompts, max_new, tokenizer.eos_ids, tokenizer.pad_id, bs, bar)
            predictions = [tokenizer.decode(g) for g in generated]
            loss = total / n if n else float("nan")
            results[task] = {
                **generation_metrics(kinds.pop(), predictions, [e.completion for e in exs]),
                "loss": loss,
                "perplexity": _perplexity(loss),
                "prompt_tokens": sum(map(len, prompts)) / len(prompts),  # the price of k shots
                "examples": len(exs),
            }
            if outputs is not None:
                outputs[task] = [{"prompt": e.prompt, "reference": e.completion, "output": p}
                                 for e, p in zip(exs, predictions)]
    finally:
        bar.close()
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------
# the report: eval.json + eval.md

SECTIONS = ("base", "base_kshot", "finetuned")
_TITLES = {"base": "base", "base_kshot": "base k-shot", "finetuned": "fine-tuned"}


def pick_samples(outputs: dict[str, dict[str, list[dict]]], per_task: int) -> list[dict]:
    """Side-by-side samples from evaluate_model's `outputs` of several sections
    ({section: {task: [...]}}): the first `per_task` examples of every task, as
    [{"task", "prompt", "reference", "outputs": {section: text}}]."""
    samples = []
    tasks = list(dict.fromkeys(t for sec in outputs.values() for t in sec))
    for task in tasks:
        for i in range(per_task):
            rows = {s: o[task][i] for s, o in outputs.items() if task in o and i < len(o[task])}
            if not rows:
                break
            first = next(iter(rows.values()))
            samples.append({"task": task, "prompt": first["prompt"], "reference": first["reference"],
                            "outputs": {s: r["output"] for s, r in rows.items()}})
    return samples


def _fmt(metric: str, v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if metric == "examples" or isinstance(v, int):
        return f"{v:.0f}"
    if metric in ("prompt_tokens", "bleu") or abs(v) >= 100:  # tokens, BLEU 0-100, large perplexities
        return f"{v:.2f}"
    return f"{v:.4f}"


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def format_report(results: dict, samples=(), shots: int | None = None) -> str:
    sections = [s for s in SECTIONS if s in results] + [s for s in results if s not in SECTIONS]
    titles = {s: _TITLES.get(s, s) for s in sections}
    if shots and "base_kshot" in titles:
        titles["base_kshot"] = f"base {shots}-shot"
    diff = "base" in results and "finetuned" in results
    lines = ["# Evaluation", ""]
    if diff:
        lines += ["Δ = fine-tuned − base. Accuracy and ROUGE are 0-1, BLEU 0-100; lower is better for "
                  "loss and perplexity. `prompt_tokens` is the mean prompt length (the cost of k shots).", ""]
    tasks = list(dict.fromkeys(t for s in sections for t in results[s]))
    for task in tasks:
        metrics = list(dict.fromkeys(m for s in sections for m in results[s].get(task, {})))
        head = ["metric"] + [titles[s] for s in sections] + (["Δ"] if diff else [])
        lines += [f"## {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in metrics:
            vals = [results[s].get(task, {}).get(m) for s in sections]
            row = [m] + ["–" if v is None else _fmt(m, v) for v in vals]
            if diff:
                b, f = results["base"].get(task, {}).get(m), results["finetuned"].get(task, {}).get(m)
                row.append("–" if b is None or f is None or m in ("examples", "prompt_tokens")
                           else ("+" if f >= b else "") + _fmt(m, f - b))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if samples:
        lines += ["## Example generations", ""]
        seen: Counter = Counter()
        for smp in samples:
            seen[smp["task"]] += 1
            secs = [s for s in sections if s in smp["outputs"]] + [s for s in smp["outputs"] if s not in sections]
            lines += [f"### {smp['task']}, example {seen[smp['task']]}", "", "Prompt:", "", "```text", smp["prompt"].strip(), "```", "",
                      "| reference | " + " | ".join(titles.get(s, s) for s in secs) + " |",
                      "|" + "---|" * (len(secs) + 1),
                      "| " + " | ".join(_cell(t) for t in [smp["reference"]] + [smp["outputs"][s] for s in secs]) + " |",
                      ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def write_generations(run_dir, section: str, outputs: dict[str, list[dict]]) -> None:
    """Every generation of one section as RUN_DIR/generations/SECTION.jsonl ({task, prompt,
    reference, output} per line): for reading by eye, and so a resumed run's report still shows
    the base model's outputs next to the fine-tuned ones."""
    path = Path(run_dir) / "generations" / f"{section}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task": task, **row}, ensure_ascii=False) for task, rows in outputs.items() for row in rows]
    _write_atomic(path, "".join(line + "\n" for line in lines))


def read_generations(run_dir, sections) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for section in sections:
        path = Path(run_dir) / "generations" / f"{section}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                out.setdefault(section, {}).setdefault(row.pop("task"), []).append(row)
    return out


def write_report(run_dir, results: dict, samples=None, n_samples: int = 3, shots: int | None = None) -> str:
    """Writes RUN_DIR/eval.json ({section: {task: {metric: value}}}, sections base / base_kshot /
    finetuned as present) and RUN_DIR/eval.md; returns the markdown. samples=None takes the first
    n_samples generations per task from RUN_DIR/generations/ (see evaluate_for_run)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ordered = {s: results[s] for s in SECTIONS if s in results}
    ordered.update({s: v for s, v in results.items() if s not in ordered})
    if samples is None:
        samples = pick_samples(read_generations(run_dir, ordered), n_samples)
    _write_atomic(run_dir / "eval.json", json.dumps(ordered, indent=2) + "\n")
    md = format_report(ordered, samples, shots)
    _write_atomic(run_dir / "eval.md", md)
    return md


# ---------------------------------------------------------------------------------------------
# runs: `ftcore eval`, and the evaluations inside `ftcore train`

def eval_examples(cfg, tokenizer, datasets) -> tuple[list, list]:
    """(test examples, k-shot pool): the test split plus, with eval.heldout, the test records under
    the held-out instruction paraphrases ('rating@heldout1', never trained on); the pool is the
    training split, plus a sample of training records under the paraphrases (so a held-out task's
    shots show the same instruction as its test prompt)."""
    from ftcore.data import heldout_examples

    test, pool = list(datasets.test), list(datasets.train)
    if cfg.eval.heldout:
        test += heldout_examples(datasets, tokenizer, cfg)
        if cfg.eval.shots > 0:
            records = list(datasets.records.get("train", []))
            random.Random(cfg.run.seed).shuffle(records)
            pool += heldout_examples(records[:max(50, 10 * cfg.eval.shots)], tokenizer, cfg)
    return test, pool


def evaluate_for_run(cfg, model_dir, tokenizer, datasets, device, base: bool,
                     section: str | None = None) -> dict[str, dict]:
    """Loads the model in model_dir (plain, unsharded, on `device`) and evaluates it:
    {"base": ..., "base_kshot": ... (eval.shots > 0)} when base, else {section or "finetuned": ...}.
    Generations go to RUN_DIR/generations/. One process, no collectives: under torchrun call it on
    rank 0 while the other ranks wait at a barrier."""
    from ftcore.model import Transformer

    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, cfg.model.dtype), device=device).eval()
    test, pool = eval_examples(cfg, tokenizer, datasets)
    runs = [("base", None), ("base_kshot", pool)] if base else [(section or "finetuned", None)]
    if base and cfg.eval.shots <= 0:
        runs = runs[:1]
    results = {}
    for name, shots_pool in runs:
        print(f"evaluating {model_dir} ({name.replace('kshot', f'{cfg.eval.shots}-shot')})", flush=True)
        outputs: dict = {}
        results[name] = evaluate_model(model, tokenizer, test, cfg.eval, device, shots_pool=shots_pool,
                                       outputs=outputs, seed=cfg.run.seed, progress=cfg.log.progress)
        write_generations(cfg.run.dir, name, outputs)
    del model
    return results


def run_eval(cfg, model_dirs: list[str], device=None) -> dict:
    """`ftcore eval CONFIG --model BASE_DIR --model FINETUNED_DIR`: both models on the test split
    (and held-out paraphrases), the base also k-shot with eval.shots; writes eval.json/eval.md to
    run.dir and prints the report. A single --model is reported as "finetuned"."""
    from ftcore.config import ConfigError
    from ftcore.data import prepare_datasets
    from ftcore.parallel import pick_device
    from ftcore.tokenizer import Tokenizer

    if not 1 <= len(model_dirs) <= 2:
        raise ConfigError(f"ftcore eval takes --model BASE_DIR --model FINETUNED_DIR (or one --model), "
                          f"got {len(model_dirs)}")
    for d in model_dirs:
        if not (Path(d) / "config.json").is_file():
            raise ConfigError(f"--model {d}: no config.json there")
    device = torch.device(device) if device is not None else pick_device(cfg.train.device)
    tokenizer = Tokenizer.from_dir(model_dirs[0])
    datasets = prepare_datasets(cfg, tokenizer)
    results = {}
    if len(model_dirs) == 2:
        results.update(evaluate_for_run(cfg, model_dirs[0], tokenizer, datasets, device, base=True))
    results.update(evaluate_for_run(cfg, model_dirs[-1], tokenizer, datasets, device, base=False))
    report = write_report(cfg.run.dir, results, n_samples=cfg.eval.samples, shots=cfg.eval.shots)
    print(report, flush=True)
    return results
