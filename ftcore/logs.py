"""What a run shows while it trains: the tqdm line, metrics.jsonl and, with log.tensorboard = true,
TensorBoard event files in RUN_DIR/tensorboard/. Every rank measures; rank 0 writes.

A record covers the steps since the previous one (its window: log.every steps), as transformers'
Trainer, torchtitan and TRL log:

    loss               the window's loss: each step's loss weighted by its completion tokens, so
                       the step's own normalisation over the whole window (log.every=1: the step's)
    step_loss          the last step's loss alone
    lr, grad_norm      the last step's
    tokens             input tokens trained on since the run began
    completion_tokens  the window's completion tokens (the weights of `loss`)
    window_steps       how many steps the window holds
    tokens_per_s       the window's input tokens over the time its steps took (validation and
                       checkpoint saving not counted)
    peak_mem_bytes     the highest peak of the window's steps, each measured from its own start
                       (memory.reset_peak before every step): CUDA allocated bytes; CPU the
                       process's peak resident set (memory.peak_mem_bytes says what that counts)
    nonfinite_steps    only when there were any: steps with a non-finite loss (train.nonfinite =
                       skip), left out of `loss`

Nothing here waits for the device: a step's loss arrives as a Python float from its one host sync
(step.optimizer_step). A checkpoint carries the open window (TrainLog.window_state), so the first
record after a resume covers the same steps, with the same loss, as in a run never stopped.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ftcore.config import Config, ConfigError, LogConfig
from ftcore.memory import peak_mem_bytes, reset_peak
from ftcore.parallel import Process
from ftcore.rundir import MetricsLog

TENSORBOARD = "tensorboard"  # RUN_DIR/tensorboard/: `tensorboard --logdir RUN_DIR/tensorboard`


def check_tensorboard(log: LogConfig) -> None:
    """log.tensorboard = true without the extra: said before any work."""
    if log.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError('log.tensorboard=true needs the tensorboard package: pip install -e ".[tensorboard]" '
                              "(or set log.tensorboard=false)") from None


@dataclass
class Window:
    """The steps since the last record, as sums kept on the host."""
    steps: int = 0
    loss_sum: float = 0.0         # Σ step loss × the step's completion tokens, over finite steps
    completion_tokens: int = 0    # of the finite steps
    nonfinite_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    peak_mem_bytes: int = 0

    def add(self, loss: float, completion_tokens: int, tokens: int, seconds: float, peak: int) -> None:
        self.steps += 1
        if math.isfinite(loss):
            self.loss_sum += loss * completion_tokens
            self.completion_tokens += completion_tokens
        else:
            self.nonfinite_steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.peak_mem_bytes = max(self.peak_mem_bytes, peak)

    def record(self) -> dict:
        if self.completion_tokens:
            loss = self.loss_sum / self.completion_tokens
        else:  # no completion token: zero loss, as for a step (NaN when every step was non-finite)
            loss = math.nan if self.nonfinite_steps else 0.0
        rec = {"loss": loss, "completion_tokens": self.completion_tokens, "window_steps": self.steps,
               "tokens_per_s": self.tokens / self.seconds, "peak_mem_bytes": self.peak_mem_bytes}
        if self.nonfinite_steps:
            rec["nonfinite_steps"] = self.nonfinite_steps
        return rec


class TrainLog:
    """The loop's logging. Per step: begin() before its work, end(...) after it; validation(...)
    after an evaluation; window_state() into a checkpoint; close() after the loop. TensorBoard's
    events are flushed at every record, as transformers' TensorBoard callback does: a live
    TensorBoard shows the newest record, and a run that dies loses none of what it logged."""

    def __init__(self, cfg: Config, run_dir: Path, proc: Process, resume_step: int | None, window: dict | None):
        self.every, self.last_step, self.device = cfg.log.every, cfg.train.max_steps, proc.device
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step, proc.is_main)
        self.tensorboard = tensorboard_writer(run_dir, resume_step) if cfg.log.tensorboard and proc.is_main else None
        self.window = Window(**(window or {}))
        self.bar = tqdm(total=cfg.train.max_steps, initial=resume_step or 0, desc="train",
                        disable=not (proc.is_main and cfg.log.progress), dynamic_ncols=True)
        self.t_step = 0.0
        if not reset_peak(self.device) and proc.is_main:
            print("peak_mem_bytes: this system does not let the peak resident set be reset "
                  "(/proc/self/clear_refs), so each record holds the process's peak since it began", flush=True)

    def begin(self) -> None:
        reset_peak(self.device)
        self.t_step = time.perf_counter()

    def end(self, step: int, loss: float, lr: float, grad_norm: float, completion_tokens: int, tokens: int,
            tokens_seen: int) -> None:
        """Step `step` (1-based) is done; a record when a window closes (log.every, the last step)."""
        self.window.add(loss, completion_tokens, tokens, time.perf_counter() - self.t_step, peak_mem_bytes(self.device))
        self.bar.update(1)
        if step % self.every and step != self.last_step:
            return
        rec = {"step": step, **self.window.record(), "step_loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens_seen}
        self.window = Window()
        self.metrics.write(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                             mem=f"{rec['peak_mem_bytes'] / 2**30:.2f}G")
        if self.tensorboard is not None:
            for tag, value in (("train/loss", rec["loss"]), ("train/step_loss", loss), ("train/lr", lr),
                               ("train/grad_norm", grad_norm), ("train/tokens_per_s", rec["tokens_per_s"]),
                               ("train/peak_mem_gib", rec["peak_mem_bytes"] / 2**30)):
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()

    def validation(self, step: int, val_loss: float) -> None:
        self.metrics.write({"step": step, "val_loss": val_loss})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("val/loss", val_loss, step)
            self.tensorboard.flush()
        if self.metrics.enabled:
            self.bar.write(f"step {step}: val_loss {val_loss:.4f}")

    def window_state(self) -> dict:
        """The open window, for the checkpoint about to be written."""
        return asdict(self.window)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def tensorboard_writer(run_dir: Path, resume_step: int | None):
    """A SummaryWriter on RUN_DIR/tensorboard/. A fresh start deletes an earlier run's event files
    (as MetricsLog deletes its metrics.jsonl). A resume passes purge_step: TensorBoard then drops
    what the stopped run logged after its checkpoint, so no step shows twice or out of order."""
    from torch.utils.tensorboard import SummaryWriter
    log_dir = run_dir / TENSORBOARD
    if resume_step is None:
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
    return SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


def log_evaluation(run_dir: Path, results: dict, step: int) -> None:
    """eval.json's headline numbers (per task and section: base, base k-shot, fine-tuned, the
    baseline) in TensorBoard as eval/TASK/SECTION/METRIC at the run's last step."""
    from torch.utils.tensorboard import SummaryWriter

    from ftcore.evaluation.report import headline_numbers
    with SummaryWriter(str(run_dir / TENSORBOARD)) as writer:
        for (task, section, metric), value in headline_numbers(results).items():
            writer.add_scalar(f"eval/{task}/{section}/{metric}", value, step)
