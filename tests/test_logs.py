"""What a run shows while it trains (ftcore/logs.py): each metrics.jsonl record holds its window's
completion-token-weighted mean loss, its tokens over its time and the highest per-step peak memory;
a resume keeps the windows; TensorBoard's own reader reads the events back; `ftcore plot` overlays
runs; the tensorboard extra missing is one line, exit 2."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ftcore.cli import main
from ftcore.config import load_config
from helpers import make_run_setup, run_overrides

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"train": {"max_steps": 8}}
F32 = 2 ** -24  # TensorBoard's event files hold float32: |fl(x) - x| <= 2^-24 |x|


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("tiny"))


def _train(overrides: list[str]) -> dict:
    from ftcore.parallel import shutdown
    from ftcore.train import train
    try:
        return train(load_config(None, overrides))
    finally:
        shutdown()


def _records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads RUN_DIR/tensorboard/ (its purge rules included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def per_step(tiny_setup, tmp_path_factory) -> list[dict]:
    """Every step's own record (log.every=1): what the windows are checked against. The same
    config in the same process computes the same step losses, so a window's mean of them is the
    same float64 sum: equal to float64 rounding (rel 1e-12 leaves 1e3 ulps of room)."""
    run = tmp_path_factory.mktemp("every1") / "run"
    _train(run_overrides(tiny_setup, run, COMMON))
    steps, _ = _records(run)
    assert [r["step"] for r in steps] == list(range(1, 9)) and all(r["window_steps"] == 1 for r in steps)
    return steps


def _window(per_step: list[dict], first: int, last: int) -> tuple[float, int, int]:
    """(completion-token-weighted mean loss, completion tokens, input tokens) of steps first..last."""
    rs = per_step[first - 1:last]
    n = sum(r["completion_tokens"] for r in rs)
    tokens = rs[-1]["tokens"] - (per_step[first - 2]["tokens"] if first > 1 else 0)
    return sum(r["step_loss"] * r["completion_tokens"] for r in rs) / n, n, tokens


WINDOWS = [(1, 3), (4, 6), (7, 8)]  # log.every=3 over 8 steps: the last window is the last 2 steps


def _assert_windows(steps: list[dict], per_step: list[dict]) -> None:
    """log.every=3's records are each their window's mean of the steps' own records."""
    assert [r["step"] for r in steps] == [3, 6, 8]
    for r, (first, last) in zip(steps, WINDOWS):
        mean, n, _ = _window(per_step, first, last)
        assert r["window_steps"] == last - first + 1 and r["completion_tokens"] == n
        assert r["loss"] == pytest.approx(mean, rel=1e-12)
        assert r["step_loss"] == per_step[last - 1]["step_loss"] and r["tokens"] == per_step[last - 1]["tokens"]


class _Clock:
    """time.perf_counter for ftcore.logs: every call is 0.25 s later, so each step takes 0.25 s."""
    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        self.t += 0.25
        return self.t


def test_a_record_is_its_windows_mean(tiny_setup, per_step, tmp_path, monkeypatch):
    import ftcore.logs
    monkeypatch.setattr(ftcore.logs, "time", _Clock())
    run = tmp_path / "run"
    _train(run_overrides(tiny_setup, run, COMMON, log=dict(every=3)))
    steps, _ = _records(run)
    _assert_windows(steps, per_step)
    for r, (first, last) in zip(steps, WINDOWS):  # the window's tokens over its 0.25 s per step
        assert r["tokens_per_s"] == pytest.approx(_window(per_step, first, last)[2] / (0.25 * (last - first + 1)),
                                                  rel=1e-12)
    # the windows' losses are not any single step's: the test would see a record of the last step
    assert all(abs(r["loss"] - r["step_loss"]) > 1e-6 * r["loss"] for r in steps)


def test_resume_keeps_the_windows_and_tensorboard_shows_each_step_once(tiny_setup, per_step, tmp_path, monkeypatch):
    """Stopped after step 7 (records 3 and 6 written, the last checkpoint at step 4, in the middle of
    the window 4..6), then resumed: the record at step 6 again covers steps 4..6 (step 4 from the
    checkpoint), and TensorBoard shows steps 3, 6, 8 once each, with metrics.jsonl's values."""
    from ftcore.logs import TrainLog
    run = tmp_path / "run"
    args = run_overrides(tiny_setup, run, COMMON, log=dict(every=3, tensorboard="true"), checkpoint=dict(every=4))
    end = TrainLog.end

    def stop_after_step_7(self, step, *a):
        end(self, step, *a)
        if step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "end", stop_after_step_7)
    with pytest.raises(KeyboardInterrupt):
        _train(args)
    monkeypatch.setattr(TrainLog, "end", end)
    assert [r["step"] for r in _records(run)[0]] == [3, 6]  # logged past the checkpoint, in both places
    assert [s for s, _ in _scalars(run)["train/loss"]] == [3, 6]

    _train(args)  # train.resume=auto: from the checkpoint of step 4
    steps, _ = _records(run)
    _assert_windows(steps, per_step)
    scalars = _scalars(run)
    for tag, key in (("train/loss", "loss"), ("train/step_loss", "step_loss"), ("train/lr", "lr")):
        assert [s for s, _ in scalars[tag]] == [3, 6, 8], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in steps], rel=F32, abs=0), tag


def test_tensorboard_events_read_back(tiny_setup, tmp_path):
    run = tmp_path / "run"
    results = _train(run_overrides(tiny_setup, run, train=dict(max_steps=6), log=dict(tensorboard="true"),
                                   eval=dict(every=3, base="true", final="true", max_examples=4, max_new_tokens=4)))
    steps, vals = _records(run)
    scalars = _scalars(run)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s")):
        assert scalars[tag] == [(r["step"], pytest.approx(r[key], rel=F32, abs=0)) for r in steps], tag
    assert scalars["train/peak_mem_gib"] == [(r["step"], pytest.approx(r["peak_mem_bytes"] / 2**30, rel=F32, abs=0))
                                             for r in steps]
    assert scalars["val/loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=F32, abs=0)) for r in vals]
    assert [r["step"] for r in vals] == [3, 6]
    # the evaluation's headline numbers, per task, for the base and the fine-tuned model, at the last step
    for task, kind_metric in (("rating", "macro_f1"), ("summary", "rougeL")):
        for section in ("baseline", "base", "finetuned"):
            want = results[section][task][kind_metric]
            assert scalars[f"eval/{task}/{section}/{kind_metric}"] == [(6, pytest.approx(want, rel=F32, abs=0))]
        for section in ("base", "finetuned"):
            if kind_metric == "macro_f1":
                assert scalars[f"eval/{task}/{section}/rank_macro_f1"] == [
                    (6, pytest.approx(results[section][task]["rank_macro_f1"], rel=F32, abs=0))]


HEAVY_FIRST_STEP = """
import sys, torch, ftcore.train
from ftcore.cli import main
forward_backward, calls = ftcore.train.forward_backward, []
def heavy_first_step(*a, **kw):
    calls.append(1)
    if len(calls) == 1:
        big = torch.ones(64 * 2**20)  # 256 MiB, every page written
        del big
    return forward_backward(*a, **kw)
ftcore.train.forward_backward = heavy_first_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the CPU figure is Linux's VmHWM")
def test_peak_memory_is_each_steps_own(tiny_setup, tmp_path):
    """Step 1 holds 256 MiB more than the others for a moment: only its record shows it. Before,
    the figure was the process's peak since it began and stayed at that height for every step.
    A block that big is mapped for itself and unmapped when freed (above glibc's mmap threshold,
    also under hardware.keep_freed_memory), so later steps start from a resident set without it;
    56 MiB are left for what else grows between steps (the tiny model's steps use a few MiB). A run
    of its own, as a user's is: a long-lived test process may hold a peak no step reaches again."""
    import subprocess
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", HEAVY_FIRST_STEP, "train", "configs/tiny_cpu.toml",
                        *run_overrides(tiny_setup, run, train=dict(max_steps=3))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    peaks = [r["peak_mem_bytes"] for r in _records(run)[0]]
    assert peaks[0] - max(peaks[1:]) >= 200 * 2**20, peaks


def test_window_leaves_out_non_finite_steps():
    """train.nonfinite=skip: a skipped step's NaN does not hide the window's other steps."""
    from ftcore.logs import Window
    w = Window()
    w.add(2.0, 10, 100, 1.0, 5)
    w.add(math.nan, 30, 100, 1.0, 7)
    w.add(1.0, 30, 100, 2.0, 6)
    assert w.record() == {"loss": (2.0 * 10 + 1.0 * 30) / 40, "completion_tokens": 40, "window_steps": 3,
                          "tokens_per_s": 300 / 4.0, "peak_mem_bytes": 7, "nonfinite_steps": 1}
    empty = Window()
    empty.add(0.0, 0, 100, 1.0, 5)  # no completion token: zero loss, as for a step
    assert empty.record()["loss"] == 0.0
    nan = Window()
    nan.add(math.inf, 10, 100, 1.0, 5)
    assert math.isnan(nan.record()["loss"])


def test_tensorboard_without_the_extra_is_one_line_before_any_work(tiny_setup, tmp_path, monkeypatch, capsys):
    from ftcore.parallel import shutdown
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    run = tmp_path / "run"
    try:
        rc = main(["train", str(ROOT / "configs" / "tiny_cpu.toml"),
                   *run_overrides(tiny_setup, run, log=dict(tensorboard="true"))])
    finally:
        shutdown()
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and 'pip install -e ".[tensorboard]"' in lines[0], lines
    assert not run.exists()


# ------------------------------------------------------------------------------------------------
# ftcore plot

def _fake_run(run_dir: Path, scale: float) -> None:
    run_dir.mkdir(parents=True)
    recs = [{"step": s, "loss": scale / s, "lr": 1e-3, "tokens_per_s": 1000.0 * scale, "peak_mem_bytes": 2**30}
            for s in range(1, 6)] + [{"step": 5, "val_loss": scale / 4}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_plot_overlays_runs_labelled_by_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    a, b = tmp_path / "runs" / "bf16", tmp_path / "runs" / "fp32"
    _fake_run(a, 2.0)
    _fake_run(b, 3.0)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    out = tmp_path / "both.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and not (a / "curves.png").exists()
    loss_ax = figures[0].axes[0]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [str(a), f"{a} (validation)",
                                                                          str(b), f"{b} (validation)"]
    train_a, _, train_b, _ = loss_ax.get_lines()
    assert list(train_a.get_ydata()) == [2.0 / s for s in range(1, 6)]
    assert list(train_b.get_ydata()) == [3.0 / s for s in range(1, 6)]
    assert len(figures[0].axes[3].get_lines()) == 2  # memory: one line per run
    # one run: as before, RUN_DIR/curves.png with train and validation
    assert main(["plot", str(a)]) == 0 and (a / "curves.png").stat().st_size > 1000
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == ["train", "validation"]
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)
    capsys.readouterr()
    # several runs need --out; the suffix names a format matplotlib writes
    for args in ([str(a), str(b)], [str(a), "--out", str(tmp_path / "x.nope")],
                 [str(a), "--out", str(tmp_path / "missing" / "x.png")]):
        assert main(["plot", *args]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
