"""The training loop: full fine-tune of every weight, one loop for 1 and N processes.

    base model ── eval (zero-shot, k-shot) ── fine-tune ── export final/ ── eval ── report

The step itself (forward_backward, optimizer_step) is ftcore/step.py, which the benches call too.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftcore import checkpoint as ckpt
from ftcore.config import Config, ConfigError, accumulation_steps, check_kernels, to_toml
from ftcore.data import (Datasets, Example, StepSampler, check_chat_template, collate, format_stats, micro_batches,
                         prepare_datasets, resolve_templates, set_chat_template)
from ftcore.export import export_hf
from ftcore.files import write_atomic
from ftcore.hardware import MatmulShape, keep_freed_memory, resolve_auto
from ftcore.source import check_source, load_tokenizer, read_config
from ftcore.step import NonFiniteSkips, autocast_context, forward_backward, optimizer_step, to_device
from ftcore.logs import TrainLog, check_tensorboard, log_evaluation
from ftcore.memory import AllocationTrace, PeakRSSGrowth
from ftcore.model import IGNORE_INDEX, Transformer
from ftcore.offload import ActivationOffload, check_offload
from ftcore.optim import build_optimizer, check_optimizer_in_backward
from ftcore.parallel import (Process, all_reduce_sum, use_ddp, use_fsdp, broadcast_from_main, apply_activation_checkpointing,
                             apply_compile, apply_ddp, apply_fsdp, barrier, grad_scale_for_reduction, init_distributed)
from ftcore.rundir import (BASE_EVAL_INPUTS, BASE_INPUTS, INPUTS_FILE, RunLock, changed_input, check_cached_base,
                           check_fresh_start, check_resume_config, inputs_record)
from ftcore.tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------------
# model set-up: precision, activation checkpointing, compile, FSDP

def import_plugins(cfg: Config) -> None:
    """User modules named in train.plugins, imported before the model is built, so that the kernels
    they register can be chosen by name (train.loss = "mine")."""
    import importlib
    for name in cfg.train.plugins:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"train.plugins: cannot import {name!r} ({e})") from None


def build_model(cfg: Config, model_dir: Path, proc: Process) -> Transformer:
    """The model to train. Without FSDP: loaded whole, then parallelized. Under FSDP no rank ever
    holds the whole model: built on the meta device, parallelized (checkpointing, compile,
    fully_shard), then each rank fills its own shards from the files."""
    import_plugins(cfg)
    check_kernels(cfg.train.kernels)  # again: plugins may have registered the names
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if not use_fsdp(cfg, proc.world_size):
        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=proc.device, loss=cfg.train.loss,
                                            kernels=cfg.train.kernels)
        return parallelize(model, cfg, proc)
    from ftcore.weights import load_into_shards
    with torch.device("meta"):
        model = Transformer(read_config(model_dir), loss=cfg.train.loss, kernels=cfg.train.kernels).to(dtype)
    parallelize(model, cfg, proc)
    with PeakRSSGrowth() as rss:
        # cpu_offload: the shards live in CPU memory (FSDP copies each unit's to the GPU to gather)
        shard_bytes = load_into_shards(model, model_dir, "cpu" if cfg.train.cpu_offload else proc.device,
                                       buffers_device=proc.device)
    total = model.config.num_params() * torch.finfo(dtype).bits // 8
    print(f"rank {proc.rank}: loaded its shards of {model_dir}: {shard_bytes / 2**20:,.1f} MiB of "
          f"{total / 2**20:,.1f} MiB; peak resident memory grew {rss.growth_bytes / 2**20:,.1f} MiB", flush=True)
    return model


def parallelize(model: Transformer, cfg: Config, proc: Process) -> Transformer:
    """Activation checkpointing, then compile, then FSDP, per block: the order every run (and
    every benchmark row) applies them in."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(model)
    if use_fsdp(cfg, proc.world_size):
        apply_fsdp(model, proc, cfg.train.precision, cfg.train.reshard_after_forward, cfg.train.cpu_offload)
    return model


# ------------------------------------------------------------------------------------------------
# validation loss: every rank runs the same number of forwards (FSDP all-gathers in each)

@torch.no_grad()
def validation_loss(model, examples: list[Example], cfg: Config, proc: Process, autocast, pad_id: int) -> float:
    if not examples:
        return float("nan")
    m = cfg.train.micro_batch_size
    groups = [examples[i:i + m] for i in range(0, len(examples), m)]
    per_rank = math.ceil(len(groups) / proc.world_size)
    mine = groups[proc.rank::proc.world_size]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=proc.device)
    for i in range(per_rank):
        group = mine[i] if i < len(mine) else groups[0]
        batch = collate(group, mode="pad", pad_id=pad_id)
        batch = to_device(batch, proc.device)
        if i >= len(mine):
            batch["labels"].fill_(IGNORE_INDEX)  # a filler forward so ranks stay in step
        with autocast:
            loss_sum, n = model(**batch)
        total += torch.stack([loss_sum.double(), n.double()])
    model.train(was_training)
    all_reduce_sum(total)
    loss_sum, n = total.tolist()
    return loss_sum / max(n, 1)


# ------------------------------------------------------------------------------------------------
# the run

def prepare_base(cfg: Config, run_dir: Path, proc: Process, inputs: dict, cached: bool) -> Path:
    """The base model: model.path (an HF directory or a GGUF file), or a tiny model pretrained here
    from scratch into RUN_DIR/base/ with `inputs` (what it is made from) recorded beside it; reused
    when `cached` (made from the same inputs: rundir.check_cached_base)."""
    if cfg.model.path:
        return check_source(cfg.model.path, "model.path")
    from ftcore.pretrain import pretrain_base
    base = run_dir / "base"
    if proc.is_main and cached:
        print(f"{base}: pretrained earlier from the same inputs ({INPUTS_FILE}), reused", flush=True)
    elif proc.is_main:
        pretrain_base(cfg, base, proc.device, inputs)
    barrier(proc)  # the other ranks wait for rank 0's tokenizer and base model
    return base


def base_eval_inputs(cfg: Config, base_dir: Path, device) -> dict:
    """What the base model's evaluation (eval_base.json) depends on: its config keys, the base
    itself (what it was pretrained from, or model.path's files) and the dtype it is evaluated in."""
    from ftcore.evaluate import eval_dtype
    inputs = inputs_record(cfg, BASE_EVAL_INPUTS)
    if cfg.model.path:
        files = [base_dir] if base_dir.is_file() else sorted(p for p in base_dir.iterdir() if p.is_file())
        inputs["base files"] = {p.name: p.stat().st_size for p in files}
    else:
        inputs["base"] = json.loads((base_dir / INPUTS_FILE).read_text())
    inputs["eval dtype"] = str(eval_dtype(cfg, base_dir, device))
    return inputs


def train(cfg: Config) -> dict:
    """One run in cfg.run.dir, holding its lock (ftcore.rundir) from start to end: set-up (checks,
    base model, data, base evaluation), the fine-tuning loop, finish (export, evaluation, report)."""
    proc = init_distributed(cfg.train.device, need_group=use_fsdp(cfg, 1), cpu_collectives=cfg.train.cpu_offload)
    if proc.device.type == "cpu" and (said := keep_freed_memory()) and proc.is_main:
        print(said, flush=True)
    check_offload(cfg.train, proc.device)  # before anything is written
    check_tensorboard(cfg.log)
    check_optimizer_in_backward(cfg, accumulation_steps(cfg, proc.world_size), ddp=use_ddp(cfg, proc.world_size))
    lock = RunLock(Path(cfg.run.dir)) if proc.is_main else None
    try:
        run = set_up(cfg, proc)
        model = fine_tune(cfg, proc, run)
        return finish(cfg, proc, run, model)
    finally:
        if lock is not None:
            lock.release()


def check_splits(cfg: Config, datasets: Datasets) -> None:
    """An empty validation or test split would give a NaN loss or an empty report after training."""
    n = sum(len(r) for r in datasets.records.values())
    for split, needed, why in (("validation", cfg.eval.every > 0, "eval.every=0"),
                               ("test", cfg.eval.base or cfg.eval.final, "eval.base=false eval.final=false")):
        if needed and not datasets.split(split):
            raise ConfigError(f"data: the {split} split is empty ({n} records split {cfg.data.split}): add records, "
                              f"raise its ratio in data.split, or set {why}")


@dataclass
class Run:
    """What set-up hands to the loop and to the finish."""
    dir: Path
    resume_from: Path | None
    base_dir: Path
    tokenizer: Tokenizer
    datasets: Datasets
    results: dict                                            # eval.json so far (baselines, base)
    phase_s: dict[str, float] = field(default_factory=dict)  # wall time per phase, printed at the end
    t_start: float = field(default_factory=time.perf_counter)

    def phase_done(self, name: str, t_phase: float) -> None:
        self.phase_s[name] = time.perf_counter() - t_phase


def set_up(cfg: Config, proc: Process) -> Run:
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    say = print if proc.is_main else (lambda *_: None)

    # the run directory, before any expensive work: a fresh run never mixes with an old one, and a
    # resume follows the recorded config
    ckpt_root = run_dir / "checkpoints"
    if proc.is_main:
        ckpt.cleanup_partial(ckpt_root)
    barrier(proc)
    if cfg.train.resume == "never":
        check_fresh_start(run_dir, ckpt.checkpoints(ckpt_root))
    # a base pretrained in this directory is this run's only if made from its inputs (taken before a
    # resume sets "auto" keys to their recorded choices: the record holds the keys as configured)
    base_inputs = {} if cfg.model.path else inputs_record(cfg, BASE_INPUTS)
    base_cached = bool(base_inputs) and check_cached_base(run_dir, base_inputs)
    resume_from = ckpt.latest_checkpoint(ckpt_root, say) if cfg.train.resume == "auto" else None
    if resume_from is not None:
        check_resume_config(run_dir, cfg, say)

    check_chat_template(cfg.data)  # a mistake in the chat template or in a prompt template (its name, file,
    resolve_templates(cfg.data)    # Jinja) ends the run before pretraining
    t_start = time.perf_counter()
    base_dir = prepare_base(cfg, run_dir, proc, base_inputs, base_cached)
    pretrain_s = time.perf_counter() - t_start
    tokenizer = load_tokenizer(base_dir)
    set_chat_template(tokenizer, cfg.data)  # data.chat_template: final/ carries the template trained on
    datasets = prepare_datasets(cfg.data, tokenizer, seed=cfg.run.seed, train_cfg=cfg.train)
    check_splits(cfg, datasets)
    # "auto" becomes this machine's choice for this model, once; config.toml records the choice.
    # Rank 0 decides (the CPU probe times matmuls: ranks timing at once would slow each other and
    # could disagree), the others take its choice.
    if proc.is_main:
        shape = MatmulShape.of(read_config(base_dir), cfg.train.micro_batch_size * cfg.data.max_seq_len)
        for line in resolve_auto(cfg.train, proc.device, shape):
            say(line)
    cfg.train.loss, cfg.train.precision = broadcast_from_main((cfg.train.loss, cfg.train.precision), proc)
    if cfg.checkpoint.export_gguf:  # checked before training, not found wanting after it
        from ftcore.gguf import check_exportable
        check_exportable(read_config(base_dir), tokenizer, f"checkpoint.export_gguf={cfg.checkpoint.export_gguf!r}")
    if proc.is_main:
        print(format_stats(datasets.stats), flush=True)
        write_atomic(run_dir / "config.toml", to_toml(cfg))  # validated and resolved: this is what runs
    barrier(proc)
    run = Run(run_dir, resume_from, base_dir, tokenizer, datasets, results={}, t_start=t_start)
    if not cfg.model.path:
        run.phase_s["pretrain"] = pretrain_s

    from ftcore.evaluate import baseline_for_run, evaluate_for_run
    if proc.is_main and (cfg.eval.base or cfg.eval.final):
        run.results = baseline_for_run(cfg, tokenizer, datasets)
    t_phase = time.perf_counter()
    base_results_path = run_dir / "eval_base.json"
    if cfg.eval.base:
        if proc.is_main:
            # a resumed run does not evaluate the base twice, unless what that evaluation covered changed
            inputs = base_eval_inputs(cfg, base_dir, proc.device)
            cached = _read_json(base_results_path) if resume_from is not None else {}
            if cached.get("inputs") == inputs:
                run.results.update(cached["results"])
            else:
                if cached:
                    say(f"evaluating the base model again: {base_results_path.name} covered other inputs "
                        f"({changed_input(cached.get('inputs') or {}, inputs)})")
                run.results.update(evaluate_for_run(cfg, base_dir, tokenizer, datasets, proc.device, base=True))
                _write_json(base_results_path, {"inputs": inputs, "results": run.results})
        barrier(proc)
    run.phase_done("base eval", t_phase)
    return run


def fine_tune(cfg: Config, proc: Process, run: Run):
    """The loop: every step's examples from the sampler, its micro-batches on this rank, one update.
    Returns the trained model."""
    t_phase = time.perf_counter()
    model = build_model(cfg, run.base_dir, proc)
    # what the step runs: the model, or DDP around it (the rest of the loop sees the model itself)
    step_model = apply_ddp(model, proc) if use_ddp(cfg, proc.world_size) else model
    reduce_scale = grad_scale_for_reduction(proc)
    optimizer, scheduler = build_optimizer(model, cfg, proc.device)
    autocast = autocast_context(cfg, proc.device)
    offload = ActivationOffload(proc.device, head=model.norm) if cfg.train.activation_offload else contextlib.nullcontext()
    train_set, accum, pad_id = run.datasets.train, accumulation_steps(cfg, proc.world_size), run.tokenizer.pad_id
    sampler = StepSampler(len(train_set), cfg.train.global_batch_size, cfg.run.seed)
    # per example, once: the step's global counts are then a sum of global-batch-size lookups
    train_targets = [ex.num_targets for ex in train_set]
    train_tokens = [len(ex.input_ids) - 1 for ex in train_set]

    start_step, tokens_seen, state = 0, 0, {}
    if run.resume_from is not None:
        state = ckpt.load_checkpoint(run.resume_from, model, optimizer, proc)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start_step, tokens_seen = state["step"], state["tokens"]
        if proc.is_main:
            print(f"resumed from {run.resume_from} (step {start_step})", flush=True)

    log = TrainLog(cfg, run.dir, proc, start_step if run.resume_from else None, state.get("log_window"))
    model.train()
    skipped = NonFiniteSkips(cfg, log.bar if proc.is_main else None)
    for step in range(start_step, cfg.train.max_steps):
        log.begin()
        indices = sampler.indices(step)
        num_targets = sum(train_targets[i] for i in indices)
        step_tokens = sum(train_tokens[i] for i in indices)
        batches = micro_batches([train_set[i] for i in indices], cfg.train.micro_batch_size, accum_steps=accum,
                                rank=proc.rank, world_size=proc.world_size, mode=cfg.data.batching, pad_id=pad_id,
                                max_seq_len=cfg.data.max_seq_len)
        loss_sum = forward_backward(step_model, [to_device(b, proc.device) for b in batches], num_targets, autocast,
                                    reduce_scale, offload)
        lr = scheduler.get_last_lr()[0]
        loss, gnorm = optimizer_step(model, optimizer, loss_sum, num_targets, cfg.train.grad_clip, skipped, step)
        scheduler.step()
        sampler.seek(step + 1)
        tokens_seen += step_tokens
        done = step + 1
        log.end(done, loss, lr, gnorm, num_targets, step_tokens, tokens_seen)  # a record per window (ftcore/logs.py)

        if cfg.eval.every and done % cfg.eval.every == 0:
            log.validation(done, validation_loss(model, run.datasets.validation, cfg, proc, autocast, pad_id))
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.train.max_steps:
            ckpt.save_checkpoint(run.dir / "checkpoints", done, model, optimizer,
                                 {"step": done, "tokens": tokens_seen, "scheduler": scheduler.state_dict(),
                                  "sampler": sampler.state_dict(), "log_window": log.window_state()},
                                 proc, cfg.checkpoint.keep)
    log.close()
    run.phase_done("fine-tune", t_phase)
    return model


def finish(cfg: Config, proc: Process, run: Run, model) -> dict:
    """Export final/, evaluate it, write the report and the curves; returns eval.json's content."""
    from ftcore.evaluate import evaluate_for_run, write_report
    t_phase = time.perf_counter()
    final_dir = run.dir / "final"
    if cfg.checkpoint.export_final or cfg.eval.final:
        fsdp = use_fsdp(cfg, proc.world_size)
        # under FSDP: what the gathers and the file being written hold in host memory at the peak
        with AllocationTrace() if fsdp else contextlib.nullcontext() as mem:
            export_hf(model, final_dir, proc, run.tokenizer, max_shard_bytes=cfg.checkpoint.max_shard_mb * 2**20)
        if fsdp:
            print(f"rank {proc.rank}: exported {final_dir} tensor by tensor; peak host memory allocated "
                  f"{mem.peak / 2**20:,.1f} MiB", flush=True)
        if cfg.checkpoint.export_gguf and proc.is_main:  # from the files just written, one tensor at a time
            from ftcore.export import export
            gguf_type = cfg.checkpoint.export_gguf
            print(f"wrote {export(str(final_dir), str(final_dir / f'model-{gguf_type}.gguf'), gguf_type=gguf_type, progress=cfg.log.progress)}",
                  flush=True)
    if cfg.eval.final and proc.is_main:
        run.results.update(evaluate_for_run(cfg, final_dir, run.tokenizer, run.datasets, proc.device, base=False))
    run.phase_done("export + final eval", t_phase)
    if proc.is_main and cfg.train.max_steps > 0:
        draw_curves(run.dir)
    if proc.is_main and run.results:
        print(write_report(run.dir, run.results, n_samples=cfg.eval.samples, shots=cfg.eval.shots), flush=True)
        if cfg.log.tensorboard:
            log_evaluation(run.dir, run.results, cfg.train.max_steps)
    if proc.is_main:
        print("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in run.phase_s.items()) +
              f"; total {time.perf_counter() - run.t_start:.0f} s", flush=True)
    barrier(proc)
    return run.results


def draw_curves(run_dir: Path) -> None:
    """RUN_DIR/curves.png for eval.md, when matplotlib is installed (an optional extra)."""
    from ftcore.evaluation.plot import plot_run
    try:
        plot_run(run_dir)
    except ConfigError:
        pass  # no matplotlib or no metrics: `ftcore plot` says which


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is none (or a torn or foreign one)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
