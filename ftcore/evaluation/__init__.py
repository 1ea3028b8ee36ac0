"""Evaluation: how much better than the base model is the fine-tuned one, and than a trivial answer?

Per task (= template name, held-out paraphrases included) a model gets:
  - the completion loss / perplexity, teacher forced, on completion tokens only;
  - its greedy answer, scored by the task kind's metrics (ftcore.evaluation.metrics): accuracy, macro-F1,
    per-class recall and a confusion matrix for classification; ROUGE for summarization; BLEU and
    ROUGE-L for generation and translation; the share of identical outputs for all;
  - for classification also `rank_accuracy` / `rank_macro_f1`: every label of the task's label set
    scored by the log-probability of its tokens after the prompt, the most likely one taken (how
    evaluation harnesses score multiple choice). A base model that never produces the answer
    format still gets a meaningful number this way.
The base model is also evaluated k-shot (eval.shots solved training examples in the prompt, chosen
to fit the context the model was trained on). Beside the models, `baseline_results` scores the
trivial answers every gain must beat: the training split's majority label for classification, the
first k words of the source text for the generative kinds.

    evaluate_model    one model, a list of examples -> {task: {metric: value}}
    evaluate_for_run  load a model directory, evaluate it as base (+ k-shot) or fine-tuned
    baseline_results  the majority / lead baselines of a run's test examples (ftcore.evaluation.baselines)
    run_eval          `ftcore eval CONFIG --model BASE_DIR --model FINETUNED_DIR`
The report (eval.json, eval.md) is ftcore.evaluation.report's.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ftcore.evaluation.baselines import baseline_results, lead_source  # noqa: F401 (re-exported)
from ftcore.evaluation.metrics import bleu, classification_metrics, generation_metrics, natural_order, normalize_label, rouge  # noqa: F401 (re-exported)
from ftcore.evaluation.report import read_generations, write_generations, write_report  # noqa: F401 (re-exported)
from ftcore.evaluation.scoring import (MAX_RANKED_LABELS, LabelSet, _ShotBuilder, completion_loss,  # noqa: F401 (re-exported)
                                       continuation_logprobs, evaluate_model, label_logprobs, label_sets,
                                       rank_classify)


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
        test += heldout_examples(datasets, tokenizer, cfg.data)
        if cfg.eval.shots > 0:
            records = list(datasets.records.get("train", []))
            random.Random(cfg.run.seed).shuffle(records)
            pool += heldout_examples(records[:max(50, 10 * cfg.eval.shots)], tokenizer, cfg.data)
    return test, pool


def baseline_for_run(cfg, tokenizer, datasets, out_dir=None) -> dict[str, dict]:
    """{"baseline": baseline_results(...)} for a run's test examples (held-out paraphrases included)."""
    from ftcore.data.template_sources import resolve_templates
    from ftcore.data.templates import HELDOUT

    test, _ = eval_examples(cfg, tokenizer, datasets)
    templates = {t.name: t for t, _ in resolve_templates(cfg.data)}
    templates.update({t.name: t for ts in HELDOUT.values() for t in ts})
    records = {r["record_id"]: r for r in datasets.records.get("test", [])}
    outputs: dict = {}
    results = {"baseline": baseline_results(test, datasets.train, records, templates, cfg.eval.max_examples,
                                            datasets.stats.get("train_labels"), outputs=outputs,
                                            max_heldout_examples=cfg.eval.max_heldout_examples)}
    write_generations(out_dir or cfg.run.dir, "baseline", outputs)  # per-example answers: the report's intervals resample them
    return results


def eval_dtype(cfg, model_dir, device) -> torch.dtype:
    """model.dtype, with auto decided as train.precision=auto decides (the CPU probe, at the width
    of this model and a batch of eval.batch_size prompts of 128 tokens)."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    from ftcore.hardware import MatmulShape, auto_precision
    from ftcore.source import read_config
    precision, _ = auto_precision(torch.device(device), MatmulShape.of(read_config(model_dir), cfg.eval.batch_size * 128))
    return torch.float32 if precision == "fp32" else torch.bfloat16


def evaluate_for_run(cfg, model_dir, tokenizer, datasets, device, base: bool,
                     section: str | None = None, out_dir=None) -> dict[str, dict]:
    """Loads the model in model_dir (plain, unsharded, on `device`) and evaluates it:
    {"base": ..., "base_kshot": ... (eval.shots > 0)} when base, else {section or "finetuned": ...}.
    Generations go to OUT_DIR/generations/ (default: run.dir). One process, no collectives: under torchrun call it on
    rank 0 while the other ranks wait at a barrier."""
    from ftcore.data import chat_template
    from ftcore.model import Transformer

    test, pool = eval_examples(cfg, tokenizer, datasets)
    # the template chat examples were rendered in (`messages` records: whatever data.prompt_format says)
    chat = chat_template(cfg.data, tokenizer, messages=any(e.messages is not None for e in test))
    model = Transformer.from_pretrained(model_dir, dtype=eval_dtype(cfg, model_dir, device), device=device).eval()
    runs = [("base", None), ("base_kshot", pool)] if base else [(section or "finetuned", None)]
    if base and cfg.eval.shots <= 0:
        runs = runs[:1]
    results = {}
    for name, shots_pool in runs:
        print(f"evaluating {model_dir} ({name.replace('kshot', f'{cfg.eval.shots}-shot')})", flush=True)
        outputs: dict = {}
        results[name] = evaluate_model(model, tokenizer, test, cfg.eval, device, shots_pool=shots_pool,
                                       outputs=outputs, seed=cfg.run.seed, progress=cfg.log.progress,
                                       label_pool=datasets.train + datasets.answer_forms, chat=chat)
        write_generations(out_dir or cfg.run.dir, name, outputs)
    del model
    return results


def run_eval(cfg, model_dirs: list[str], device=None, out_dir=None) -> dict:
    """`ftcore eval CONFIG --model BASE_DIR --model FINETUNED_DIR`: both models on the test split
    (and held-out paraphrases), the base also k-shot with eval.shots, beside the trivial baselines;
    writes eval.json/eval.md (and generations/) to out_dir and prints the report. A single --model
    is reported as "finetuned". out_dir defaults to run.dir for two models, and for one to
    run.dir/eval-NAME (NAME: the model directory's name), so that a one-sided report never replaces
    a run's base-vs-fine-tuned comparison."""
    from ftcore.config import ConfigError
    from ftcore.data import prepare_datasets
    from ftcore.parallel import pick_device
    from ftcore.source import check_source, load_tokenizer

    if not 1 <= len(model_dirs) <= 2:
        raise ConfigError(f"ftcore eval takes --model BASE_DIR --model FINETUNED_DIR (or one --model), "
                          f"got {len(model_dirs)}")
    for d in model_dirs:
        check_source(d, "--model")
    device = torch.device(device) if device is not None else pick_device(cfg.train.device)
    tokenizer = load_tokenizer(model_dirs[0])
    datasets = prepare_datasets(cfg.data, tokenizer, seed=cfg.run.seed, train_cfg=cfg.train)
    if out_dir is None:
        out_dir = Path(cfg.run.dir) if len(model_dirs) == 2 else \
            Path(cfg.run.dir) / f"eval-{Path(model_dirs[0]).resolve().name}"
    results = baseline_for_run(cfg, tokenizer, datasets, out_dir=out_dir)
    if len(model_dirs) == 2:
        results.update(evaluate_for_run(cfg, model_dirs[0], tokenizer, datasets, device, base=True, out_dir=out_dir))
    results.update(evaluate_for_run(cfg, model_dirs[-1], tokenizer, datasets, device, base=False, out_dir=out_dir))
    report = write_report(out_dir, results, n_samples=cfg.eval.samples, shots=cfg.eval.shots)
    print(report, flush=True)
    return results
