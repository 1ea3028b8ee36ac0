"""The training loop: accumulation, processes, activation checkpointing, resume, precision modes."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftcore.config import load_config
from ftcore.model import ModelConfig, Transformer
from ftcore.tokenizer import Tokenizer
from helpers import FAULTY_CLI, bf16_loss_bound, make_run_setup, run_cli, run_overrides, run_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny HF checkpoint with a trained tokenizer, and a small review dataset on disk."""
    return make_run_setup(tmp_path_factory.mktemp("tiny"))


_overrides = run_overrides


def _losses(run_dir: Path, key="loss") -> list[float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


_run_cli = run_cli


def _train_inproc(overrides):
    from ftcore.parallel import shutdown
    from ftcore.train import train
    try:
        return train(load_config(None, overrides))
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------

def _step_grads(tiny_setup, tmp_path, micro: int, ac: str = "none"):
    """Gradients of the first optimizer step of a global batch of 8, via the loop's own pieces."""
    from ftcore.data import StepSampler, micro_batches, prepare_datasets
    from ftcore.parallel import apply_activation_checkpointing
    from ftcore.step import forward_backward
    import contextlib
    cfg = load_config(None, _overrides(tiny_setup, tmp_path / "g", train=dict(micro_batch_size=micro), data=dict(templates='["review", "rating"]')))
    tok = Tokenizer.from_dir(tiny_setup / "base")
    ds = prepare_datasets(cfg.data, tok, seed=cfg.run.seed, train_cfg=cfg.train)
    model = Transformer.from_pretrained(tiny_setup / "base")
    apply_activation_checkpointing(model, ac)
    ex = [ds.train[i] for i in StepSampler(len(ds.train), 8, 0).indices(0)]
    lengths = sorted(e.num_targets for e in ex)
    batches = micro_batches(ex, micro, accum_steps=8 // micro, pad_id=tok.pad_id)
    loss_sum = forward_backward(model, batches, sum(e.num_targets for e in ex), contextlib.nullcontext())
    return loss_sum, {n: p.grad.clone() for n, p in model.named_parameters()}, lengths


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_accumulation_matches_one_big_batch(tiny_setup, tmp_path):
    loss_a, g_a, lengths = _step_grads(tiny_setup, tmp_path, micro=2)   # 4 accumulation steps
    loss_b, g_b, _ = _step_grads(tiny_setup, tmp_path, micro=8)         # one micro-batch
    assert lengths[-1] > 3 * lengths[0], f"completions should differ a lot in length: {lengths}"
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for n in g_a:
        assert _rel(g_a[n], g_b[n]) <= 1e-6, n


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients(tiny_setup, tmp_path, mode):
    _, g_ref, _ = _step_grads(tiny_setup, tmp_path, micro=4, ac="none")
    _, g_ac, _ = _step_grads(tiny_setup, tmp_path, micro=4, ac=mode)
    for n in g_ref:
        assert _rel(g_ac[n], g_ref[n]) <= 1e-6, n


def test_zero_completion_tokens_step(tiny_setup):
    """No completion token: zero loss, zero (finite) gradients, and the update runs on them."""
    from ftcore.step import clip_gradients, forward_backward, optimizer_step
    import contextlib
    model = Transformer.from_pretrained(tiny_setup / "base")
    ids = torch.randint(0, 100, (2, 9))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100), "position_ids": torch.arange(9).expand(2, 9)}
    loss_sum = forward_backward(model, [batch], 0, contextlib.nullcontext())
    assert loss_sum.item() == 0.0 and clip_gradients(model, None, 1.0, loss_sum.device).item() == 0.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    from ftcore.config import Config
    from ftcore.step import NonFiniteSkips
    assert optimizer_step(model, opt, loss_sum, 0, 1.0, NonFiniteSkips(Config(), None)) == (0.0, 0.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and all(p.grad is None for p in model.parameters())


def test_metrics_and_run_dir(tiny_setup, tmp_path):
    run = tmp_path / "run"
    _train_inproc(_overrides(tiny_setup, run, eval=dict(every=3), checkpoint=dict(export_final="true")))
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "peak_mem_bytes"} <= set(r)
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6] and all("loss" not in r for r in vals)
    assert (run / "config.toml").is_file() and (run / "final" / "config.json").is_file()
    assert load_config(run / "config.toml").train.max_steps == 6
    Transformer.from_pretrained(run / "final")  # the export loads back


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-mixed", "bf16"])
def test_precision_modes(tiny_setup, tmp_path, precision):
    _train_inproc(_overrides(tiny_setup, tmp_path / "fp32"))
    _train_inproc(_overrides(tiny_setup, tmp_path / precision, train=dict(precision=precision)))
    ref, got = _losses(tmp_path / "fp32"), _losses(tmp_path / precision)
    assert all(torch.isfinite(torch.tensor(got)))
    # every step's loss within what bf16's rounding on the way to the loss allows (the 2-layer base);
    # a broken mode (wrong scaling, NaN) does not stay this close
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < bf16_loss_bound(num_layers=2), (ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", ["on", "off"])  # FSDP2 shards; off: every rank the whole model, DDP
def test_two_processes_match_one(tiny_setup, tmp_path, fsdp):
    """Every parallel mode ftcore accepts trains one model: the 2-process run's losses (two
    micro-batches per rank and step, so accumulation is in play) and its exported weights are the
    1-process run's (fp32, 1e-5 relative)."""
    args = _overrides(tiny_setup, tmp_path / "one", train=dict(max_steps=10, fsdp=fsdp),
                      eval=dict(every=5, final="true", max_examples=4, max_new_tokens=4))
    r1 = _run_cli(["train", "configs/tiny_cpu.toml", *args])
    assert r1.returncode == 0, r1.stderr[-3000:]
    args2 = [a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in args]
    r2 = _run_cli(["train", "configs/tiny_cpu.toml", *args2, "log.tensorboard=true"], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 10
    for a, b in zip(l1, l2):
        assert abs(a - b) / abs(a) <= 1e-5, (l1, l2)
    assert (tmp_path / "two" / "eval.json").is_file()
    from safetensors.torch import load_file
    w1, w2 = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w2[k] - w1[k]).norm() <= 1e-5 * w1[k].norm(), k
    # TensorBoard from rank 0 alone (events.out.tfevents.TIME.HOST.PID.N): the loop's file and the evaluation's
    events = sorted((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2 and len({p.name.split(".")[-2] for p in events}) == 1, events


@pytest.mark.slow
def test_two_nodes_match_one(tiny_setup, tmp_path):
    args = _overrides(tiny_setup, tmp_path / "one", train=dict(max_steps=4, fsdp="on"))
    r1 = _run_cli(["train", "configs/tiny_cpu.toml", *args])
    assert r1.returncode == 0, r1.stderr[-3000:]
    args2 = [a.replace(str(tmp_path / "one"), str(tmp_path / "nodes")) for a in args]
    port = random.randint(20000, 40000)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "ftcore-test", "-m", "ftcore.cli", "train", "configs/tiny_cpu.toml", *args2],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "nodes")):
        assert abs(a - b) / abs(a) <= 1e-5


@pytest.mark.slow
def test_a_save_that_fails_on_one_rank_stops_every_rank(tiny_setup, tmp_path):
    """Rank 1's part of a checkpoint fails (its disk is full): both ranks stop with the one line,
    none waits at a barrier, and no half-written checkpoint is left."""
    args = ["train", "configs/tiny_cpu.toml", *_overrides(tiny_setup, tmp_path / "run", train=dict(max_steps=4, fsdp="on"),
                                                          checkpoint=dict(every=2))]
    ranks = run_ranks(["--fail-save-rank", "1", *args], cli=FAULTY_CLI)
    for code, _, err in ranks:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "saving checkpoint step_00000002" in lines[0], err[-3000:]
    assert "No space left on device" in ranks[1][2] and "failed on another rank" in ranks[0][2]
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


def _kill_when(p: subprocess.Popen, cond, timeout=120.0) -> bool:
    """SIGKILL the process as soon as cond() holds (polled every 2 ms)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        if cond():
            p.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_losses(tiny_setup, tmp_path):
    steps = 12
    common = dict(train=dict(max_steps=steps), checkpoint=dict(every=2, keep=2))
    ref = tmp_path / "ref"
    r = _run_cli(["train", "configs/tiny_cpu.toml", *_overrides(tiny_setup, ref, **common)])
    assert r.returncode == 0, r.stderr[-3000:]
    want = _losses(ref)

    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    args = [sys.executable, *FAULTY_CLI, "--save-delay-s", "0.3", "train", "configs/tiny_cpu.toml",
            *_overrides(tiny_setup, run, **common)]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def n_metrics():
        p = run / "metrics.jsonl"
        return len(p.read_text().splitlines()) if p.exists() else 0

    rng = random.Random(0)
    # kill points: mid checkpoint write (a .tmp directory exists), after a random number of logged
    # steps, and mid write again; each time resume with train.resume=auto (the default)
    kill_points = [
        lambda: any(p.name.endswith(".tmp") for p in ckpts.glob("*")) if ckpts.exists() else False,
        lambda k=rng.randint(1, 3): n_metrics() >= k + 5,
        lambda: any(p.name.endswith(".tmp") for p in ckpts.glob("step_0000000[6-9].tmp")) if ckpts.exists() else False,
    ]
    killed = 0
    for cond in kill_points:
        p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed += _kill_when(p, cond)
        p.communicate(timeout=240)
        # whatever the kill left, resume never sees a half-written checkpoint as complete
        from ftcore.checkpoint import latest_checkpoint
        latest = latest_checkpoint(ckpts)
        assert latest is None or not latest.name.endswith(".tmp")
    assert killed >= 2
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, steps + 1))
    assert _losses(run) == pytest.approx(want, rel=1e-6, abs=0)


def test_plugin_registers_a_loss_kernel(tiny_setup, tmp_path, monkeypatch):
    """A user's module named in train.plugins registers a kernel that train.loss then selects."""
    (tmp_path / "my_kernels.py").write_text(
        "import torch.nn.functional as F\n"
        "from ftcore.kernels import register_loss\n"
        "CALLS = []\n"
        "def mine(hidden, weight, labels, bias=None, ignore_index=-100, reduction='sum'):\n"
        "    CALLS.append(len(labels))\n"
        "    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=ignore_index, reduction=reduction)\n"
        "register_loss('mine', mine)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    _train_inproc(_overrides(tiny_setup, run, train=dict(max_steps=2, plugins='["my_kernels"]', loss="mine")))
    import my_kernels
    assert len(my_kernels.CALLS) == 2 * 4  # 2 steps x 4 micro-batches
    from ftcore.config import ConfigError
    with pytest.raises(ConfigError, match="train.plugins: cannot import 'no_such_module'"):
        _train_inproc(_overrides(tiny_setup, tmp_path / "r2", train=dict(plugins='["no_such_module"]')))


def test_non_finite_loss_stops_or_skips(tiny_setup, tmp_path):
    from ftcore.kernels import get_loss, register_loss
    from ftcore.step import NonFiniteError

    def nan_at_step_2(hidden, weight, labels, **kw):
        nan_at_step_2.calls += 1
        loss = get_loss("torch")(hidden, weight, labels, **kw)
        return loss * float("nan") if 5 <= nan_at_step_2.calls <= 8 else loss  # micro-batches of step 2
    nan_at_step_2.calls = 0
    register_loss("nan_at_step_2", nan_at_step_2)

    with pytest.raises(NonFiniteError, match="step 2: non-finite loss"):
        _train_inproc(_overrides(tiny_setup, tmp_path / "stop", train=dict(max_steps=3, loss="nan_at_step_2")))

    nan_at_step_2.calls = 0
    run = tmp_path / "skip"
    _train_inproc(_overrides(tiny_setup, run, train=dict(max_steps=3, loss="nan_at_step_2", nonfinite="skip"), checkpoint=dict(export_final="true")))
    losses = _losses(run)
    assert len(losses) == 3 and not math.isfinite(losses[1]) and math.isfinite(losses[2])
    final = Transformer.from_pretrained(run / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())  # the skipped step changed nothing


@pytest.mark.slow
def test_compiled_blocks_same_gradients():
    """train.compile: each block compiled (here with selective checkpointing inside, as in the
    fast GPU configuration) gives the eager model's loss and gradients."""
    import copy
    from ftcore.parallel import apply_activation_checkpointing, apply_compile
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    eager = Transformer(cfg)
    eager.init_weights(seed=0)
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, "selective")
    apply_compile(compiled)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    for m in (eager, compiled):
        loss, _ = m(x, labels=y)
        loss.backward()
        m.loss_value = loss.item()
    assert compiled.loss_value == pytest.approx(eager.loss_value, rel=1e-6)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert _rel(b.grad, a.grad) <= 1e-5, n


def test_export_of_a_checkpoint_equals_the_run_stopped_there(tiny_setup, tmp_path):
    """`ftcore export RUN/checkpoints/step_N` gives the weights a run stopped at step N exports (both
    runs are inside the 2 warmup steps, where the lr does not depend on max_steps)."""
    from ftcore.export import export_checkpoint
    _train_inproc(_overrides(tiny_setup, tmp_path / "long", train=dict(max_steps=4), checkpoint=dict(every=2)))
    _train_inproc(_overrides(tiny_setup, tmp_path / "short", train=dict(max_steps=2), checkpoint=dict(export_final="true")))
    export_checkpoint(str(tmp_path / "long" / "checkpoints" / "step_00000002"), str(tmp_path / "exported"))
    a = Transformer.from_pretrained(tmp_path / "exported")
    b = Transformer.from_pretrained(tmp_path / "short" / "final")
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_fused_loss_under_fsdp_matches_torch_loss(tiny_setup, tmp_path):
    """The Triton loss (interpreter on CPU) runs inside forward on FSDP's unsharded, tied lm_head:
    2 processes with packed batches give the 1-process plain-torch losses."""
    common = dict(train=dict(max_steps=4, fsdp="on"), data=dict(batching="pack"))
    r1 = _run_cli(["train", "configs/tiny_cpu.toml", *_overrides(tiny_setup, tmp_path / "torch", common, train=dict(loss="torch"))])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run_cli(["train", "configs/tiny_cpu.toml", *_overrides(tiny_setup, tmp_path / "triton", common, train=dict(loss="triton"))],
                  nproc=2, env_extra={"TRITON_INTERPRET": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    for a, b in zip(_losses(tmp_path / "torch"), _losses(tmp_path / "triton")):
        assert abs(a - b) / a <= 1e-5


def test_optimizer_in_backward_is_refused_under_ddp():
    """DDP all-reduces a gradient after its hook has run: stepping there would use this rank's own
    gradient. Refused before any work; FSDP (whose hook sees the reduced shard) stays allowed."""
    from ftcore.config import Config, ConfigError
    from ftcore.optim import check_optimizer_in_backward
    cfg = Config()
    cfg.train.optimizer_in_backward, cfg.train.grad_clip = True, 0.0
    with pytest.raises(ConfigError, match="needs FSDP"):
        check_optimizer_in_backward(cfg, 1, ddp=True)
    check_optimizer_in_backward(cfg, 1, ddp=False)
