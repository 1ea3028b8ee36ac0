"""Bad input and faults, as a new user meets them: each case is one line on stderr and exit 2
(130 for Ctrl-C), before any expensive work, and nothing already written is lost or mixed up.

The README's "Bad input" paragraph states the rules these cases hold."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from ftcore.cli import main
from helpers import make_run_setup, run_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.toml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("bad"))


def _ftcore(capsys, *args) -> tuple[int, list[str]]:
    """Runs `ftcore ARGS` in this process: (exit code, the lines it wrote to stderr)."""
    from ftcore.parallel import shutdown
    try:
        rc = main([str(a) for a in args])
    finally:
        shutdown()
    return rc, capsys.readouterr().err.strip().splitlines()


def _run_args(setup: Path, run: Path, *extra) -> list[str]:
    """`ftcore train` arguments: the shared short run, then `extra` overrides (the last one wins)."""
    return ["train", TINY, *run_overrides(setup, run, train=dict(micro_batch_size=4, lr=2e-3), eval=dict(every=0)),
            *extra]


def _one_line(rc, lines, message, code=2):
    assert rc == code and len(lines) == 1 and message in lines[0], lines


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ------------------------------------------------------------------------------------------------
# every value checked when the config is loaded: nothing is pretrained or evaluated first

@pytest.mark.parametrize("override, message", [
    ("train.loss=nope", "'train.loss' must be auto or a registered loss kernel"),
    ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
    ("train.beta1=2.0", "'train.beta1' must be in [0, 1), got 2.0"),
    ("log.every=0", "'log.every' must be >= 1, got 0"),
    ("eval.batch_size=0", "'eval.batch_size' must be >= 1, got 0"),
    ("eval.max_examples=-1", "'eval.max_examples' must be >= 0 (0 = all), got -1"),
    ("checkpoint.every=-1", "'checkpoint.every' must be >= 0"),
    ("train.warmup_steps=-5", "'train.warmup_steps' must be >= 0, got -5"),
    ("data.max_records=-1", "'data.max_records' must be >= 0 (0 = all), got -1"),
    ("train.max_skipped_steps=0", "'train.max_skipped_steps' must be >= 1"),
    ("pretrain.num_heads=3", "pretrain: hidden_size=128 must be a multiple of num_heads=3"),
] + ([("train.device=cuda", "train.device=cuda, but torch sees no CUDA device")] if not torch.cuda.is_available() else []))
def test_values_checked_at_load(override, message, tmp_path, capsys):
    rc, lines = _ftcore(capsys, "train", TINY, f"run.dir={tmp_path / 'run'}", override)
    _one_line(rc, lines, message)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# silent wrong data becomes one line

def _records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


REVIEW = {"rating": 5, "summary": "Fine", "text": "It works and it is fine."}


@pytest.mark.parametrize("records, extra, message", [
    ([dict(REVIEW, id=i % 3) for i in range(20)], [], "id '0' was already used at"),
    ([dict(REVIEW, id=i) for i in range(19)] + [dict(REVIEW, id=19, text={"body": "x"})], [],
     "field 'text' is a dict; templates take text and numbers"),
    ([dict(REVIEW, id=i) for i in range(20)], ['data.rename={stars="rating"}'], "data.rename maps a column 'stars' that no record has (columns found: id, rating, summary, text)"),
    ([dict(REVIEW, id=0)], ["eval.every=5"], "the validation split is empty (1 records"),
    ([dict(REVIEW, id=0)], [], "the test split is empty (1 records"),
])
def test_wrong_data_is_one_line(setup, records, extra, message, tmp_path, capsys):
    data = _records(tmp_path / "data.jsonl", records)
    args = _run_args(setup, tmp_path / "run", f"data.path={data}", "eval.final=true", *extra)
    _one_line(*_ftcore(capsys, *args), message)
    assert not (tmp_path / "run" / "config.toml").exists()  # nothing ran, so nothing claims to have


# ------------------------------------------------------------------------------------------------
# one run per directory, and never a fresh run mixed with an old one

def test_resume_never_refuses_an_old_runs_checkpoints(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert _ftcore(capsys, *_run_args(setup, run, "checkpoint.every=2"))[0] == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    rc, lines = _ftcore(capsys, *_run_args(setup, run, "checkpoint.every=2", "train.resume=never", "train.lr=5e-4"))
    _one_line(rc, lines, "train.resume=never, but")
    assert "holds 2 checkpoint(s) of an earlier run (newest step_00000004)" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before == ["step_00000002", "step_00000004"]
    ran = (run / "config.toml").read_text()  # still the config of what ran, not of the refused run
    assert "lr = 0.002" in ran and "0.0005" not in ran


def test_one_run_per_directory(setup, tmp_path, capsys):
    from ftcore.rundir import RunLock
    run = tmp_path / "run"
    holder = RunLock(run)
    try:
        rc, lines = _ftcore(capsys, *_run_args(setup, run))
        _one_line(rc, lines, f"run.dir {run} is in use by another ftcore run (pid {os.getpid()} on")
    finally:
        holder.release()
    # the lock file a killed run leaves behind holds no lock: the next run takes it over
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    assert _ftcore(capsys, *_run_args(setup, run))[0] == 0


# ------------------------------------------------------------------------------------------------
# checkpoints: verified at load, the newest intact one wins; a failed save keeps the others

@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(_run_args(setup, run)) == 0
    return _losses(run)


@pytest.mark.parametrize("damage", ["__0_0.distcp", "trainer_state.pt", ".metadata", "manifest.json"])
def test_corrupt_newest_checkpoint_resumes_from_the_intact_one(setup, reference, damage, tmp_path, capsys):
    run = tmp_path / "run"
    args = _run_args(setup, run, "checkpoint.every=2")
    assert _ftcore(capsys, *args)[0] == 0
    newest = run / "checkpoints" / "step_00000004"
    path = newest / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    (run / "metrics.jsonl").write_text("")  # the resumed run rewrites steps 3..6
    rc = main(args)
    assert rc == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint step_00000004: {newest}" in out and "resumed from" in out
    assert "step_00000002" in out.split("resumed from")[1].splitlines()[0]
    assert _losses(run) == pytest.approx(reference[2:], abs=1e-6)


def test_failed_save_is_one_line_and_keeps_earlier_checkpoints(setup, tmp_path, capsys, monkeypatch):
    from ftcore.checkpoint import verify_checkpoint
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if "step_00000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    rc, lines = _ftcore(capsys, *_run_args(setup, run, "checkpoint.every=2"))
    _one_line(rc, lines, "saving checkpoint step_00000004 in")
    assert "unexpected pos 704 vs 598" in lines[0] and "the earlier checkpoints are intact" in lines[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert verify_checkpoint(run / "checkpoints" / "step_00000002") is None


# ------------------------------------------------------------------------------------------------
# config.toml says what ran

def test_config_toml_says_what_ran(setup, tmp_path, capsys):
    # a run that fails validation does not overwrite the config of the run before it
    run = tmp_path / "no-checkpoints"
    assert _ftcore(capsys, *_run_args(setup, run, "train.max_steps=2"))[0] == 0
    good = (run / "config.toml").read_text()
    rc, lines = _ftcore(capsys, *_run_args(setup, run, f"data.path={tmp_path / 'missing.jsonl'}", "train.max_steps=2"))
    _one_line(rc, lines, "data.path: file not found")
    assert (run / "config.toml").read_text() == good
    run = tmp_path / "run"
    assert _ftcore(capsys, *_run_args(setup, run, "checkpoint.every=2", "train.max_steps=4"))[0] == 0
    good = (run / "config.toml").read_text()
    # with checkpoints there, a changed data.path is a resume of another run: refused, naming the key
    rc, lines = _ftcore(capsys, *_run_args(setup, run, f"data.path={tmp_path / 'missing.jsonl'}", "train.max_steps=4",
                                           "checkpoint.every=2"))
    _one_line(rc, lines, "cannot resume the run in")
    assert "data.path" in lines[0]
    assert (run / "config.toml").read_text() == good
    # a resume (from step 2) that would change the trajectory is refused, naming the keys
    rc, lines = _ftcore(capsys, *_run_args(setup, run, "train.lr=5e-4", "train.schedule=linear",
                                           "checkpoint.every=2", "train.max_steps=4"))
    _one_line(rc, lines, "cannot resume the run in")
    assert "train.lr 0.002 -> 0.0005" in lines[0] and "train.schedule 'cosine' -> 'linear'" in lines[0]
    assert (run / "config.toml").read_text() == good
    # evaluation, logging and checkpointing may change: applied, printed and recorded
    rc = main(_run_args(setup, run, "checkpoint.every=2", "train.max_steps=4", "log.every=2"))
    assert rc == 0 and "resuming with log.every changed: 1 -> 2" in capsys.readouterr().out
    assert "every = 2" in (run / "config.toml").read_text().split("[log]")[1]


# ------------------------------------------------------------------------------------------------
# the rest: skipped steps, Ctrl-C, file modes, the other commands

def test_skipped_steps_stop_after_a_few_in_a_row(setup, tmp_path, capsys):
    from ftcore.kernels import get_loss, register_loss

    def nan_from_step_2(hidden, weight, labels, **kw):
        nan_from_step_2.calls += 1
        loss = get_loss("torch")(hidden, weight, labels, **kw)
        return loss * float("nan") if nan_from_step_2.calls > 2 else loss  # 2 micro-batches a step
    nan_from_step_2.calls = 0
    register_loss("nan_from_step_2", nan_from_step_2)
    rc, lines = _ftcore(capsys, *_run_args(setup, tmp_path / "run", "train.loss=nan_from_step_2", "train.nonfinite=skip",
                                           "checkpoint.export_final=true"))
    _one_line(rc, lines, "step 4: 3 non-finite steps in a row were skipped (train.max_skipped_steps=3)")
    assert not (tmp_path / "run" / "final").exists()


def test_ctrl_c_is_a_clean_exit(setup, tmp_path, capsys, monkeypatch):
    import ftcore.train
    from ftcore.checkpoint import verify_checkpoint
    real_step = ftcore.train.forward_backward
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*a, **kw)
    monkeypatch.setattr(ftcore.train, "forward_backward", interrupted)
    run = tmp_path / "run"
    rc, lines = _ftcore(capsys, *_run_args(setup, run, "checkpoint.every=2"))
    _one_line(rc, lines, "ftcore train: interrupted (the checkpoints already written are intact", code=130)
    assert verify_checkpoint(run / "checkpoints" / "step_00000002") is None
    monkeypatch.setattr(ftcore.train, "forward_backward", real_step)
    assert main(_run_args(setup, run, "checkpoint.every=2")) == 0
    assert "resumed from" in capsys.readouterr().out


def test_exports_are_readable_like_other_files(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert _ftcore(capsys, *_run_args(setup, run, "train.max_steps=1", "checkpoint.export_final=true"))[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in (run / "final").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_eval_with_one_model_keeps_the_runs_comparison(setup, tmp_path, capsys):
    run = tmp_path / "run"
    args = _run_args(setup, run, "train.max_steps=1", "eval.base=true", "eval.final=true", "eval.max_examples=2",
                     "eval.max_new_tokens=2", "eval.shots=0", "eval.heldout=false")
    assert _ftcore(capsys, *args)[0] == 0
    report = (run / "eval.json").read_text()
    assert _ftcore(capsys, "eval", *args[1:], "--model", run / "final")[0] == 0
    assert (run / "eval.json").read_text() == report
    one = json.loads((run / "eval-final" / "eval.json").read_text())
    assert list(one) == ["baseline", "finetuned"]


def _bad_model_dir(tmp_path, setup, what):
    import shutil
    d = tmp_path / what
    shutil.copytree(setup / "base", d)
    if what == "config_not_json":
        (d / "config.json").write_text("{not json")
    elif what == "config_no_hidden_size":
        cfg = json.loads((d / "config.json").read_text())
        del cfg["hidden_size"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif what == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    elif what == "corrupt_tokenizer":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    return d


@pytest.mark.parametrize("what, message", [
    ("config_not_json", "config.json: not valid JSON"),
    ("config_no_hidden_size", "config.json: no hidden_size (an HF config.json of a llama model has them)"),
    ("no_tokenizer", "tokenizer.json: not found"),
    ("corrupt_tokenizer", "tokenizer.json: cannot load"),
])
def test_broken_model_directories(setup, tmp_path, capsys, what, message):
    d = _bad_model_dir(tmp_path, setup, what)
    _one_line(*_ftcore(capsys, "generate", "--model", d, "--prompt", "hi"), message)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "hi"], "--model /no/such/model: no config.json there"),
    (["generate", "--model", "{base}", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "--model", "{base}", "--prompt", "hi", "--dtype", "float8"], "--dtype must be float32, bfloat16"),
    (["generate", "--model", "{base}", "--prompt", "word " * 600], "the model has 512 positions"),
    (["bench", "--estimate", TINY, "--world-size", "0"], "--world-size must be >= 1, got 0"),
    (["bench", "--estimate", TINY, "train.loss=fast"], "'train.loss' must be auto or a registered loss kernel"),
    (["export", "/no/such/step", "--out", "x"], "not a training checkpoint (no trainer_state.pt), an HF directory"),
])
def test_other_commands(setup, capsys, args, message):
    _one_line(*_ftcore(capsys, *[a.replace("{base}", str(setup / "base")) for a in args]), message)


@pytest.mark.slow
def test_kill_during_pretraining_restarts_it(tmp_path):
    """SIGKILL while the quickstart's base model is pretrained: nothing half-written is taken for a
    base model; the next run pretrains it again from step 0 (it is minutes of work, not worth a
    checkpoint format of its own) and finishes."""
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    args = [sys.executable, "-m", "ftcore.cli", "train", TINY, f"run.dir={run}", "pretrain.steps=400",
            "pretrain.hidden_size=32", "pretrain.num_heads=2", "pretrain.num_kv_heads=1", "pretrain.intermediate_size=64",
            "pretrain.seq_len=64", "pretrain.batch_size=4", "pretrain.vocab_size=400", "data.synthetic.num_records=120",
            "data.max_seq_len=128", "data.max_completion_tokens=64", "train.max_steps=2", "eval.base=false",
            "eval.final=false", "eval.every=0", "log.progress=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("pretraining a base model"):
            break
    time.sleep(1.0)
    assert not (run / "base").exists(), "pretraining ended before the kill: make it longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pretraining a base model" in r.stdout and (run / "base" / "config.json").is_file()
    assert not (run / "base.tmp").exists() and (run / "metrics.jsonl").is_file()
