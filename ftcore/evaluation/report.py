"""The evaluation report: RUN_DIR/eval.json and eval.md, and the generations they sample from.

eval.json = {section: {task: {metric: value}}}, sections in the order baseline (the trivial
answers), base, base_kshot, finetuned, as present. eval.md opens with a summary — one line per
task with its headline metric, the trivial baseline beside the models and a verdict that never
calls a model better than it is — then a table per task with Δ against the base and against the
baseline, a confusion matrix per classification task, and example generations side by side.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ftcore.files import write_atomic

SECTIONS = ("baseline", "base", "base_kshot", "finetuned")
_TITLES = {"baseline": "baseline", "base": "base", "base_kshot": "base k-shot", "finetuned": "fine-tuned"}
# the number a task is judged by, per kind
HEADLINE = {"classification": "macro_f1", "summarization": "rougeL", "generation": "bleu", "translation": "bleu"}
# facts about the evaluation rather than scores: no Δ
_NO_DELTA = {"examples", "prompt_tokens", "shots", "short_of_shots", "lead_words", "majority_answer"}
_ORDER = ["accuracy", "macro_f1", "rank_accuracy", "rank_macro_f1", "rouge1", "rouge2", "rougeL", "bleu",
          "off_label_share", "distinct_share", "top_output_share", "loss", "perplexity", "majority_answer",
          "lead_words", "prompt_tokens", "shots", "short_of_shots", "examples"]
CURVES = "curves.png"  # written by `ftcore plot RUN_DIR`


def _kind(metrics: dict) -> str:
    if "macro_f1" in metrics:
        return "classification"
    if "rouge2" in metrics:
        return "summarization"
    return "generation" if "bleu" in metrics else "?"


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _fmt(metric: str, v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if metric in ("examples", "lead_words") or isinstance(v, int):
        return f"{v:.0f}"
    if metric in ("prompt_tokens", "bleu", "shots") or abs(v) >= 100:  # tokens, BLEU 0-100, large perplexities
        return f"{v:.2f}"
    return f"{v:.4f}"


def _delta(metric: str, a, b) -> str:
    if metric in _NO_DELTA or not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return "–"
    return ("+" if a >= b else "") + _fmt(metric, a - b)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def _ci(ci) -> str:
    return f"[{ci[0]:+.3g}, {ci[1]:+.3g}]"


def _verdict(task: str, results: dict, metric: str) -> str:
    """What the fine-tuned model's headline number means next to the baseline and the base: with
    paired intervals, "better" only where the whole 95 % interval of the difference is above 0."""
    ft = results.get("finetuned", {}).get(task, {})
    if metric not in ft:
        return "–"
    notes = []
    vs = ft.get("vs", {})
    names = {"baseline": "the baseline", "base": "the base", "base_kshot": "the base k-shot"}
    if vs:
        for other, c in vs.items():
            how = " (ranked)" if c["against"] == "ranked" else ""
            text = {"better": f"**better than {names[other]}{how}**", "worse": f"worse than {names[other]}{how}",
                    "tie": f"a tie with {names[other]}{how}"}[c["verdict"]]
            notes.append(f"{text}: {c['diff']:+.3g} {_ci(c['ci'])}")
    else:  # no per-example answers to pair: the point estimates only, and why
        if ft.get("no_intervals"):
            notes.append(f"no paired intervals ({ft['no_intervals']}): point estimates only")
        baseline = results.get("baseline", {}).get(task, {})
        if metric in baseline:
            gain = ft[metric] - baseline[metric]
            notes.append(f"**{gain:+.3g} over the baseline**" if gain > 0 else f"not better than the baseline ({gain:+.3g})")
        bases = [results[s][task][m] for s in ("base", "base_kshot") for m in (metric, f"rank_{metric}")
                 if m in results.get(s, {}).get(task, {})]
        if bases:
            notes.append(f"{ft[metric] - max(bases):+.3g} over the best base score")
    # a classifier that learned one answer; a writer that repeats one text (a fifth is already a lot)
    if ft.get("top_output_share", 0) >= (0.8 if metric == "macro_f1" else 0.2):
        what = "one answer" if metric == "macro_f1" else "the same output"
        notes.append(f"{what} for {ft['top_output_share']:.0%} of examples")
    return "; ".join(notes)


def headline_numbers(results: dict) -> dict[tuple[str, str, str], float]:
    """{(task, section, metric): value}: each task's headline metric in every section, and the
    models' ranked-label score (rank_METRIC) where there is one: the numbers of the summary table."""
    out = {}
    for task in dict.fromkeys(t for sec in results.values() for t in sec):
        metric = HEADLINE.get(_kind(next(sec[task] for sec in results.values() if task in sec)))
        if metric is None:
            continue
        for section, tasks in results.items():
            for key in (metric,) if section == "baseline" else (metric, f"rank_{metric}"):  # the baseline ranks nothing
                if isinstance(value := tasks.get(task, {}).get(key), (int, float)) and not isinstance(value, bool):
                    out[(task, section, key)] = float(value)
    return out


def _summary(results: dict, tasks: list[str], titles: dict[str, str], sections: list[str]) -> list[str]:
    head = ["task", "metric"] + [titles[s] for s in sections] + (["verdict"] if "finetuned" in sections else [])
    lines = ["## Summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        kind = _kind(next(results[s][task] for s in sections if task in results[s]))
        metric = HEADLINE.get(kind)
        if metric is None:
            continue
        rows = [(metric, metric, "answer" if kind == "classification" else "")]
        if kind == "classification":
            rows.append((f"rank_{metric}", metric, "ranked"))
        for key, verdict_metric, how in rows:
            cells = [task, metric.replace("_", "-") + (f" ({how})" if how else "")]
            for s in sections:
                k = key if s != "baseline" else metric
                v, ci = results[s].get(task, {}).get(k), results[s].get(task, {}).get(f"{k}_ci")
                cells.append("–" if v is None else _fmt(metric, v) + (f" [{_fmt(metric, ci[0])}, {_fmt(metric, ci[1])}]" if ci else ""))
            if "finetuned" in sections:
                cells.append(_verdict(task, results, verdict_metric) if how != "ranked" else "")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "macro-F1 (answer) scores the answer each model writes; (ranked) scores the label the model "
              "finds most likely among the task's labels, the fair number for a base model that cannot "
              "format an answer. [lo, hi]: 95 % bootstrap intervals over the test examples; a verdict's "
              "interval is the paired one of the difference (the same resamples for both models), and "
              "\"better\" means all of it is above 0."]
    if "base_kshot" in results:
        short = [(t, m) for t, m in results["base_kshot"].items() if m.get("short_of_shots", 0) > 0]
        if short:
            worst = max(short, key=lambda tm: tm[1]["short_of_shots"])
            lines += ["", f"{titles['base_kshot']}: the shots must fit the context the model was trained on; "
                      f"{len(short)} of {len(results['base_kshot'])} tasks had prompts with fewer shots than asked "
                      f"(worst: {worst[0]}, {worst[1]['short_of_shots']:.0%} of prompts short, "
                      f"{worst[1]['shots']:.2f} shots on average)."]
    return lines + [""]


def _confusion(task: str, section: str, title: str, metrics: dict) -> list[str]:
    c = metrics.get("confusion")
    if not c or not c.get("labels"):
        return []
    head = ["reference \\ answer"] + c["columns"] + ["recall"]
    lines = [f"Confusion matrix, {title} (rows: reference, columns: answer):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in zip(c["labels"], c["matrix"]):
        lines.append("| " + " | ".join([label] + [str(n) for n in row] +
                                       [f"{metrics['recall'].get(label, 0.0):.2f}"]) + " |")
    return lines + [""]


def format_report(results: dict, samples=(), shots: int | None = None, curves: str | None = None) -> str:
    sections = [s for s in SECTIONS if s in results] + [s for s in results if s not in SECTIONS]
    titles = {s: _TITLES.get(s, s) for s in sections}
    if shots and "base_kshot" in titles:
        titles["base_kshot"] = f"base {shots}-shot"
    ft = "finetuned" in results
    deltas = [(s, f"Δ {titles[s]}") for s in ("base", "baseline") if ft and s in results]
    lines = ["# Evaluation", ""]
    intro = []
    if "baseline" in results:
        intro.append("`baseline` is the trivial answer a gain must beat: the training split's majority label "
                     "for classification, the first k words of the source text for generation.")
    if deltas:
        intro.append("Δ = fine-tuned − that column. Accuracy, F1 and ROUGE are 0-1, BLEU 0-100; lower is "
                     "better for loss and perplexity. `prompt_tokens` is the mean prompt length (the cost of k shots).")
    if intro:
        lines += [" ".join(intro), ""]
    if curves:
        lines += [f"![training curves]({curves})", ""]
    tasks = list(dict.fromkeys(t for s in sections for t in results[s]))
    lines += _summary(results, tasks, titles, sections)
    for task in tasks:
        present = {m for s in sections for m, v in results[s].get(task, {}).items() if _scalar(v) and m != "no_intervals"}
        metrics = [m for m in _ORDER if m in present] + sorted(present - set(_ORDER))
        head = ["metric"] + [titles[s] for s in sections] + [name for _, name in deltas]
        lines += [f"## {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in metrics:
            vals = [results[s].get(task, {}).get(m) for s in sections]
            row = [m] + ["–" if v is None else _fmt(m, v) for v in vals]
            f = results["finetuned"].get(task, {}).get(m) if ft else None
            row += [_delta(m, f, results[s].get(task, {}).get(m)) for s, _ in deltas]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        why = next((results[s][task]["no_intervals"] for s in sections if "no_intervals" in results[s].get(task, {})), None)
        if why:
            lines += [f"No 95 % intervals for {task}: {why}.", ""]
        shown = "finetuned" if ft else next((s for s in reversed(sections) if s != "baseline"), None)
        if shown is not None:
            lines += _confusion(task, shown, titles[shown], results[shown].get(task, {}))
    if samples:
        lines += ["## Example generations", ""]
        seen: Counter = Counter()
        for smp in samples:
            seen[smp["task"]] += 1
            secs = [s for s in sections if s in smp["outputs"]] + [s for s in smp["outputs"] if s not in sections]
            lines += [f"### {smp['task']}, example {seen[smp['task']]}", "", "Prompt:", "", "```text",
                      smp["prompt"].strip(), "```", "",
                      "| reference | " + " | ".join(titles.get(s, s) for s in secs) + " |",
                      "|" + "---|" * (len(secs) + 1),
                      "| " + " | ".join(_cell(t) for t in [smp["reference"]] + [smp["outputs"][s] for s in secs]) + " |",
                      ""]
    return "\n".join(lines)


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


def write_generations(run_dir, section: str, outputs: dict[str, list[dict]]) -> None:
    """Every generation of one section as RUN_DIR/generations/SECTION.jsonl ({task, prompt,
    reference, output} per line): for reading by eye, and so a resumed run's report still shows
    the base model's outputs next to the fine-tuned ones."""
    path = Path(run_dir) / "generations" / f"{section}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task": task, **row}, ensure_ascii=False) for task, rows in outputs.items() for row in rows]
    write_atomic(path, "".join(line + "\n" for line in lines))


def read_generations(run_dir, sections) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for section in sections:
        path = Path(run_dir) / "generations" / f"{section}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                out.setdefault(section, {}).setdefault(row.pop("task"), []).append(row)
    return out


KIND_OF = {"macro_f1": "classification", "rougeL": "summarization", "bleu": "generation"}
_COMPARED = ("baseline", "base", "base_kshot")  # what the fine-tuned model is compared with


def add_intervals(results: dict, generations: dict[str, dict[str, list[dict]]], seed: int = 0) -> None:
    """Adds to `results`, from the per-example answers in `generations` ({section: {task: rows}}):
    HEADLINE_ci = [lo, hi], the 95 % bootstrap interval of each section's headline metric (and
    rank_HEADLINE_ci for ranked labels), and under finetuned[task]["vs"][other] the paired interval
    of the fine-tuned model's headline minus the other's (its answer or its ranked labels, whichever
    scores higher), with a verdict: "better" only when the whole interval is above 0."""
    from ftcore.evaluation.metrics import Resampler
    for task in dict.fromkeys(t for sec in results.values() for t in sec):
        some = next(results[s][task] for s in results if task in results[s])
        metric = HEADLINE.get(_kind(some))
        if metric is None:
            continue
        rows = {s: generations[s][task] for s in results if task in generations.get(s, {}) and task in results[s]}
        missing = [s for s in results if task in results[s] and s not in rows]
        refs = next(iter(rows.values()), [])
        other = [s for s, v in rows.items() if [r["reference"] for r in v] != [r["reference"] for r in refs]]
        why = (f"no per-example answers of {', '.join(missing)} in generations/" if missing else
               f"{', '.join(other)} scored other examples than {next(iter(rows))}" if other else None)
        if why is not None:  # said in the report, never dropped silently
            for s in results:
                if task in results[s]:
                    results[s][task]["no_intervals"] = why
        if not rows or other:
            continue  # not the same examples in the same order: nothing to pair
        labels = some.get("label_set")
        sampler = Resampler(KIND_OF[metric] if metric != "bleu" else "generation", [r["reference"] for r in refs],
                            labels, seed=seed)
        values = {}
        for s, v in rows.items():
            values[(s, metric)] = sampler.values([r["output"] for r in v])
            results[s][task][f"{metric}_ci"] = list(sampler.interval(values[(s, metric)]))
            if all("ranked" in r for r in v):
                values[(s, f"rank_{metric}")] = sampler.values([r["ranked"] for r in v])
                results[s][task][f"rank_{metric}_ci"] = list(sampler.interval(values[(s, f"rank_{metric}")]))
        if ("finetuned", metric) not in values:
            continue
        ft = values[("finetuned", metric)]
        vs = {}
        for other in _COMPARED:
            keys = [k for k in values if k[0] == other]
            if not keys:
                continue
            key = max(keys, key=lambda k: results[other][task].get(k[1], float("-inf")))
            diff = ft - values[key]
            lo, hi = sampler.interval(diff)
            vs[other] = {"metric": metric, "against": "ranked" if key[1].startswith("rank_") else "answer",
                         "diff": results["finetuned"][task][metric] - results[other][task][key[1]],
                         "ci": [lo, hi], "verdict": "better" if lo > 0 else "worse" if hi < 0 else "tie"}
        results["finetuned"][task]["vs"] = vs


def write_report(run_dir, results: dict, samples=None, n_samples: int = 3, shots: int | None = None) -> str:
    """Writes RUN_DIR/eval.json ({section: {task: {metric: value}}}, sections baseline / base /
    base_kshot / finetuned as present, with the intervals of add_intervals) and RUN_DIR/eval.md;
    returns the markdown. The intervals and samples=None (the first n_samples generations per task)
    come from RUN_DIR/generations/ (see evaluate_for_run). eval.md shows RUN_DIR/curves.png when it
    exists."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ordered = {s: results[s] for s in SECTIONS if s in results}
    ordered.update({s: v for s, v in results.items() if s not in ordered})
    generations = read_generations(run_dir, list(ordered))
    add_intervals(ordered, generations)
    if samples is None:
        samples = pick_samples({s: g for s, g in generations.items() if s != "baseline"}, n_samples)
    write_atomic(run_dir / "eval.json", json.dumps(ordered, indent=2) + "\n")
    md = format_report(ordered, samples, shots, curves=CURVES if (run_dir / CURVES).is_file() else None)
    write_atomic(run_dir / "eval.md", md)
    return md
