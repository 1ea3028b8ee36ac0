"""Memory strategies (ftcore/optim.py, ftcore/offload.py): optimizer step in backward, bf16 optimizer
states, stochastic rounding, activation offloading, FSDP2 CPU offload.

CPU: the optimizer strategies against the plain path over a few steps of a tiny model, resume, the
offloading hooks' bookkeeping, and the refusals. `-m gpu`: offloading and CPU offload on CUDA,
where they move data between devices: same losses, and the memory actually drops.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from ftcore.config import ConfigError, load_config
from ftcore.model import ModelConfig, Transformer
from ftcore.optim import AdamW, OptimizerInBackward, stochastic_round_
from helpers import make_run_setup, run_overrides

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ------------------------------------------------------------------------------------------------
# a tiny HF checkpoint + review data, and in-process runs (as tests/test_train.py)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("tiny"), n_records=64)


def overrides(setup: Path, run_dir: Path, *more: dict, **sections: dict) -> list[str]:
    """run_overrides with one micro-batch per step and no clipping: the strategies compared here
    must give the same step, so nothing may differ but the strategy."""
    return run_overrides(setup, run_dir, {"train": {"micro_batch_size": 8, "grad_clip": 0}}, *more, **sections)


def run(setup: Path, run_dir: Path, *more: dict, **kw) -> list[dict]:
    from ftcore.parallel import shutdown
    from ftcore.train import train
    try:
        train(load_config(None, overrides(setup, run_dir, *more, **kw)))
    finally:
        shutdown()
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


# ------------------------------------------------------------------------------------------------
# optimizer step in backward

# fsdp=on: FSDP2 (1 rank, gloo) fires the hooks after its reduce-scatter; full: recompute in backward
@pytest.mark.parametrize("fsdp,ac", [("off", "none"), ("on", "none"), ("off", "full")])
def test_optimizer_in_backward_same_losses(tiny, tmp_path, fsdp, ac):
    kw = dict(train=dict(fsdp=fsdp, activation_checkpointing=ac))
    ref = run(tiny, tmp_path / "plain", **kw)
    got = run(tiny, tmp_path / "inbwd", kw, train=dict(optimizer_in_backward="true"))
    # the same AdamW maths per parameter, only run earlier: the same numbers
    assert losses(got) == pytest.approx(losses(ref), rel=1e-6, abs=0)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-5)
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]  # the scheduler drives every per-parameter lr


def test_optimizer_in_backward_frees_gradients(tiny):
    model = Transformer.from_pretrained(tiny / "base")
    cfg = load_config(None, overrides(tiny, Path("unused"), train=dict(optimizer_in_backward="true")))
    from ftcore.optim import build_optimizer
    opt, _ = build_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []  # how many gradients are alive each time a hook runs
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _: seen.append(sum(q.grad is not None for q in model.parameters())))
    ids = torch.randint(0, 100, (2, 16))
    loss, _ = model(ids, labels=ids)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert max(seen) <= 2, seen  # never more than a couple at once (the plain path: all of them)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.pop_grad_norm() > 0


@pytest.mark.parametrize("version,waits", [("2.11.0+cu128", True), ("2.12.1", True), ("2.13.0", False)])
def test_optimizer_in_backward_waits_for_offloaded_gradients_before_the_torch_fix(tiny, monkeypatch, version, waits):
    """FSDP2 CPU offload + optimizer in backward on a torch without pytorch/pytorch#180666: each hook
    waits for the device before it reads its gradient (whose copy to pinned memory may be in
    flight). On the CPU with a fake CUDA device: the wait is recorded, nothing is allocated there."""
    from ftcore.optim import build_optimizer
    monkeypatch.setattr(torch, "__version__", version)
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("wait"))
    cfg = load_config(None, overrides(tiny, Path("unused"), train=dict(optimizer_in_backward="true", cpu_offload="true")))
    model = Transformer.from_pretrained(tiny / "base")
    opt, _ = build_optimizer(model, cfg, torch.device("cuda"))
    for o in opt.optimizers:
        step = o.step
        o.step = lambda step=step: (events.append("step"), step())
    ids = torch.randint(0, 100, (2, 16))
    model(ids, labels=ids)[0].backward()
    n = len(list(model.parameters()))
    assert events == (["wait", "step"] * n if waits else ["step"] * n)


@pytest.mark.parametrize("kw", [
    {},
    dict(train=dict(precision="bf16", optimizer_state_dtype="bfloat16", stochastic_rounding="true")),
    dict(train=dict(fsdp="on", optimizer_state_dtype="bfloat16")),
], ids=["fp32", "bf16-sr", "fsdp-bf16-states"])
def test_optimizer_in_backward_resume(tiny, tmp_path, capsys, kw):
    kw = (kw, dict(train=dict(optimizer_in_backward="true"), checkpoint=dict(every=3)))
    first = losses(run(tiny, tmp_path / "r", *kw))
    assert (tmp_path / "r" / "checkpoints" / "step_00000003").is_dir()
    again = losses(run(tiny, tmp_path / "r", *kw))  # resume=auto: steps 4-6 again, from the checkpoint
    assert "resumed from" in capsys.readouterr().out
    assert again == first  # identical: model, per-parameter optimizer states, lr, RNG all restored


@pytest.mark.slow
def test_optimizer_in_backward_two_processes_and_resume(tiny, tmp_path):
    """FSDP2 over 2 processes: each rank's hooks step its shards; the same losses as 1 process."""
    import os
    import random
    import subprocess
    import sys
    ref = run(tiny, tmp_path / "one", train=dict(fsdp="on"))
    args = overrides(tiny, tmp_path / "two", train=dict(optimizer_in_backward="true", micro_batch_size=4), checkpoint=dict(every=3))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ftcore.cli",
           "train", "configs/tiny_cpu.toml", *args]
    for attempt in range(2):  # the second resumes from step 3
        port = ["--master_port", str(random.randint(20000, 40000))]
        r = subprocess.run(cmd[:3] + port + cmd[3:], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                           text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        got = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
        assert losses(got) == pytest.approx(losses(ref), rel=1e-6)
        assert [g["grad_norm"] for g in got] == pytest.approx([g["grad_norm"] for g in ref], rel=1e-5)
    assert "resumed from" in r.stdout


def test_checkpoint_round_trip_keeps_per_parameter_states(tiny, tmp_path):
    """DCP through the wrapper: every per-parameter state and lr comes back, bf16 states stay bf16."""
    from ftcore import checkpoint as ckpt
    from ftcore.parallel import Process

    def build():
        model = Transformer.from_pretrained(tiny / "base")
        make = lambda groups: AdamW(groups, lr=1e-3, state_dtype=torch.bfloat16)
        opt = OptimizerInBackward([{"params": list(model.parameters())}], make)
        return model, opt

    model, opt = build()
    ids = torch.randint(0, 100, (2, 16))
    for _ in range(2):
        model(ids, labels=ids)[0].backward()
    for g in opt.param_groups:
        g["lr"] = 5e-4
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, Process(), keep=1)

    model2, opt2 = build()
    ckpt.load_checkpoint(path, model2, opt2, Process())
    assert len(opt2.state) == len(list(model2.parameters()))
    for (p, q) in zip(model.parameters(), model2.parameters()):
        s, t = opt.state[p], opt2.state[q]
        assert t["exp_avg"].dtype == torch.bfloat16 and t["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
        assert s["step"].item() == t["step"].item() == 2
    assert [g["lr"] for g in opt2.param_groups] == [5e-4] * len(opt2.param_groups)
    # the per-parameter optimizers see the loaded state (the shared dict is relinked)
    assert all(o.state is opt2.state for o in opt2.optimizers)
    assert all(o.param_groups[0] is g for o, g in zip(opt2.optimizers, opt2.param_groups))


# ------------------------------------------------------------------------------------------------
# AdamW with bf16 states, stochastic rounding

def _adamw_pair_steps(make_ours, steps=5, dtype=torch.float32):
    """Our AdamW and torch's from the same weights through the same gradients: (ours, torch's, start, ours)."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 33)
    grads = [torch.randn(64, 33) for _ in range(steps)]
    a = torch.nn.Parameter(w0.clone().to(dtype))
    b = torch.nn.Parameter(w0.clone())
    ours = make_ours([a])
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        a.grad, b.grad = g.to(dtype), g.clone()
        ours.step()
        ref.step()
    return a.detach(), b.detach(), w0, ours


def test_adamw_fp32_matches_torch():
    a, b, _, _ = _adamw_pair_steps(lambda ps: AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_adamw_chunks_match_whole(monkeypatch):
    """Slicing big tensors and bucketing small ones into CHUNK-sized foreach calls changes nothing."""
    import ftcore.optim as optim
    whole = _adamw_pair_steps(lambda ps: AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))[0]
    monkeypatch.setattr(optim, "CHUNK", 100)  # 64 x 33 = 2112 elements: 22 slices
    sliced = _adamw_pair_steps(lambda ps: AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))[0]
    assert torch.equal(whole, sliced)


def test_adamw_bf16_states_stay_bf16_and_close():
    a, b, w0, opt = _adamw_pair_steps(lambda ps: AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                                      state_dtype=torch.bfloat16))
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16 and a.dtype == torch.float32
    # bf16 keeps 8 significant bits (0.4 %): the weights' movement differs by about that much
    assert ((a - b).norm() / (b - w0).norm()).item() < 1e-2


def test_adamw_bf16_weights_fp32_maths():
    """bf16 weights: each step computed in fp32 from the bf16 weight (fp32 states), rounded once:
    torch's fp32 AdamW with the weight rounded to bf16 after every step."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 33).bfloat16()
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.float())
    ours = AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(64, 33).bfloat16()
        a.grad, b.grad = g, g.float()
        ours.step()
        ref.step()
        with torch.no_grad():
            b.copy_(b.bfloat16().float())
    assert a.dtype == torch.bfloat16 and ours.state[a]["exp_avg"].dtype == torch.float32
    # the same up to a rounding tie flipped by a last-bit fp32 difference (foreach vs single-tensor maths)
    assert (a.float() != b).float().mean() < 0.01


def test_bf16_states_same_losses_within_tolerance(tiny, tmp_path):
    ref = losses(run(tiny, tmp_path / "fp32", train=dict(max_steps=10)))
    got = losses(run(tiny, tmp_path / "bf16", train=dict(max_steps=10, optimizer_state_dtype="bfloat16")))
    # stated tolerance: 1e-4 relative per step over 10 steps (measured: 2e-6)
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 1e-4, (ref, got)
    assert got != ref  # the states really were bf16


def test_stochastic_rounding_moves_tiny_updates_in_expectation():
    torch.manual_seed(0)
    update = 1e-4  # bf16's ulp at 1.0 is 2**-7 = 0.0078: round-to-nearest drops 1e-4 every time
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    stochastic = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(1000):
        nearest.copy_(nearest.float() + update)
        stochastic_round_(stochastic, stochastic.float() + update)
    assert torch.all(nearest == 1.0)
    # expected 1 + 1000 * 1e-4 = 1.1; the spread of the mean over 4096 weights is ~5e-4
    assert abs(stochastic.float().mean().item() - 1.1) < 3e-3


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    torch.manual_seed(0)
    x = torch.randn(64, dtype=torch.float32) * 10 ** torch.randint(-3, 3, (64,)).float()
    out = torch.empty(20000, 64, dtype=torch.bfloat16)
    stochastic_round_(out, x.expand(20000, 64).contiguous())
    down = x.to(torch.bfloat16)  # one of the two neighbours...
    lo = torch.where(down.float() <= x, down.float(), torch.nextafter(down, torch.tensor(-float("inf"), dtype=torch.bfloat16)).float())
    hi = torch.where(down.float() >= x, down.float(), torch.nextafter(down, torch.tensor(float("inf"), dtype=torch.bfloat16)).float())
    assert torch.all((out.float() == lo) | (out.float() == hi))
    ulp = hi - lo
    err = (out.float().mean(0) - x).abs()
    assert torch.all(err <= 4 * ulp / (20000 ** 0.5) + 1e-12)  # 4 sigma of a Bernoulli mean, in ulps


def test_stochastic_rounding_adamw_bf16_weights():
    """A bf16 weight with AdamW updates of 1e-4: lost with round-to-nearest, kept on average with SR."""
    def train(sr: bool):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = AdamW([w], lr=1e-4, betas=(0.9, 0.95), stochastic_rounding=sr)
        for _ in range(100):
            w.grad = torch.ones_like(w)  # Adam's step is then ~lr every step
            opt.step()
        return w.detach().float()

    assert torch.all(train(False) == 1.0)
    assert abs(train(True).mean().item() - (1 - 100 * 1e-4)) < 1e-3
    assert torch.equal(train(True), train(True))  # seeded: reproducible


def test_stochastic_rounding_run_is_reproducible(tiny, tmp_path):
    kw = dict(train=dict(max_steps=4, precision="bf16", stochastic_rounding="true"))
    a = losses(run(tiny, tmp_path / "a", **kw))
    b = losses(run(tiny, tmp_path / "b", **kw))
    assert a == b and all(map(torch.isfinite, torch.tensor(a)))


# ------------------------------------------------------------------------------------------------
# activation offloading: the hooks' bookkeeping on CPU (torch.cpu's streams are no-ops)

def _tiny_for_offload(loss="torch"):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=2), loss=loss)
    model.init_weights(seed=0)
    return model, torch.randint(0, 97, (2, 24))


@pytest.mark.parametrize("ac", ["none", "full"])
@pytest.mark.parametrize("inflight,prefetch", [(1 << 30, 1 << 30), (1, 1), (1 << 14, 1 << 15)])
def test_offload_hooks_same_gradients(inflight, prefetch, ac):
    from ftcore.offload import ActivationOffload
    from ftcore.parallel import apply_activation_checkpointing

    def grads(offload: bool):
        model, ids = _tiny_for_offload()
        apply_activation_checkpointing(model, ac)
        off = ActivationOffload(torch.device("cpu"), head=model.norm, min_bytes=0, max_inflight_bytes=inflight,
                                prefetch_bytes=prefetch) if offload else contextlib.nullcontext()
        for _ in range(2):  # twice: the second forward/backward reuses the hooks' state
            model.zero_grad()
            with off:
                loss, _ = model(ids, labels=ids)
            loss.backward()
        return loss, [p.grad for p in model.parameters()], off

    ref_loss, ref, _ = grads(False)
    loss, got, off = grads(True)
    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert off.offloaded_bytes > 0
    # every saved tensor came back, nothing is left behind
    assert not off.inflight and off.inflight_bytes == 0 and not off.ready and off.ready_bytes == 0


def _block_activation_bytes(model, ids, autocast: bool) -> int:
    """What the embedding and the blocks save, counted independently of ActivationOffload: unique
    storages (memory.saved_tensor_bytes), less autocast's bf16 copy of each block weight."""
    from ftcore.memory import saved_tensor_bytes
    from ftcore.model import AttnMask
    freqs = torch.arange(ids.shape[1]).expand(ids.shape)[..., None].float() * model.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    with saved_tensor_bytes(exclude=list(model.parameters())) as saved, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x = model.embed(ids)
        for layer in model.layers:
            x = layer(x, cos, sin, AttnMask("causal"))
    casts = sum(p.numel() * 2 for p in model.layers.parameters() if p.ndim == 2) if autocast else 0
    return saved["bytes"] - casts


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_offload_moves_each_activation_once_and_nothing_of_the_head(precision):
    """What moves is what saves memory, once: activations (not weights, not autocast's casts of
    them), each tensor once however many nodes save it (q, k, v share their input), and nothing of
    the head (final norm, loss): the same bytes whether the loss keeps full logits or the fused
    loss's precomputed gradients."""
    from ftcore.offload import ActivationOffload
    autocast = precision == "bf16-autocast"
    moved = {}
    for loss in ("torch", "chunked"):
        model, ids = _tiny_for_offload(loss)
        off = ActivationOffload(torch.device("cpu"), head=model.norm, min_bytes=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), off:
            loss_sum, _ = model(ids, labels=ids)
        loss_sum.backward()
        moved[loss] = off.offloaded_bytes
    activations = _block_activation_bytes(model, ids, autocast)
    assert moved["torch"] == moved["chunked"], moved  # 0 bytes of either loss
    assert moved["torch"] == activations, (moved, activations)  # every activation, once


def test_offload_takes_tensors_on_a_bare_cuda_device(monkeypatch):
    """ActivationOffload(torch.device("cuda")) as the bench passes it: tensors live on cuda:0, which
    never equals a bare "cuda"; they must be offloaded all the same (a fake CUDA tensor, torch.cpu's
    no-op streams)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ftcore.offload import ActivationOffload
    monkeypatch.setattr(torch, "get_device_module", lambda device=None: torch.cpu)
    off = ActivationOffload(torch.device("cuda"), min_bytes=0)
    with FakeTensorMode():
        t = torch.empty(64, 64, device="cuda")
        assert t.device == torch.device("cuda", 0)
        with off:
            packed = off._pack(t)
    assert packed is not t and off.offloaded_bytes == 64 * 64 * 4


def test_offload_skips_parameters_and_small_tensors():
    from ftcore.offload import ActivationOffload
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    off = ActivationOffload(torch.device("cpu"), min_bytes=32 * 64 * 4)
    with off:
        y = lin(x).relu().sum(-1)  # saves x (8 KiB), weight.t() (a view of the parameter), relu's output
    assert off.offloaded_bytes == 2 * 32 * 64 * 4  # x and relu's output, not the weight
    y.sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------
# refusals: one line each

@pytest.mark.parametrize("kw,words", [
    (dict(train=dict(optimizer_in_backward="true", grad_clip=1.0)), "train.grad_clip=0"),
    (dict(train=dict(optimizer_in_backward="true", nonfinite="skip")), "train.nonfinite=stop"),
    (dict(train=dict(cpu_offload="true", fsdp="off")), "train.fsdp=auto or on"),
    (dict(train=dict(stochastic_rounding="true")), "train.precision=bf16"),
    (dict(train=dict(optimizer_state_dtype="float16")), "'train.optimizer_state_dtype' must be one of"),
])
def test_invalid_combinations_refused_at_load(tiny, tmp_path, kw, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides(tiny, tmp_path / "x", **kw))
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,words", [
    (dict(train=dict(optimizer_in_backward="true", micro_batch_size=2)), "set train.micro_batch_size=8"),
    (dict(train=dict(activation_offload="true")), "train.activation_offload needs CUDA"),
    (dict(train=dict(cpu_offload="true")), "train.cpu_offload needs CUDA"),
])
def test_invalid_combinations_refused_before_writing(tiny, tmp_path, kw, words):
    with pytest.raises(ConfigError) as e:
        run(tiny, tmp_path / "x", **kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_cpu_offload_loads_shards_on_the_cpu_and_buffers_where_the_forward_runs(tiny, tmp_path, monkeypatch):
    """train.cpu_offload: the shards are loaded into CPU memory, but RoPE's inv_freq must be where
    the forward runs (FSDP moves only what fully_shard saw, and that was still on the meta device).
    The meta device stands in for the GPU here: nothing is allocated on it."""
    from ftcore import train as train_mod
    from ftcore.parallel import Process
    monkeypatch.setattr(train_mod, "parallelize", lambda model, cfg, proc: model)  # FSDP needs the real device
    cfg = load_config(None, overrides(tiny, tmp_path, train=dict(fsdp="on", cpu_offload="true")))
    gpu_stand_in = torch.device("meta")
    model = train_mod.build_model(cfg, tiny / "base", Process(device=gpu_stand_in))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.inv_freq.device == gpu_stand_in


def test_stochastic_rounding_allowed_with_bf16_states_only(tiny, tmp_path):
    load_config(None, overrides(tiny, tmp_path, train=dict(stochastic_rounding="true", optimizer_state_dtype="bfloat16")))


# ------------------------------------------------------------------------------------------------
# GPU: offloading moves data between devices, so its memory saving is measured there.
# Run with `pytest -m gpu tests/test_memory_strategies.py`.

def _mid_model(device, dtype=torch.bfloat16, layers=4):
    cfg = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=layers,
                      num_heads=16, num_kv_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model.to(device=device, dtype=dtype)


def _step_peak(model, ids, ctx=contextlib.nullcontext(), optimizer=None):
    """Loss, grads and the peak CUDA memory of one forward/backward above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with ctx:
        loss, _ = model(ids, labels=ids)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return loss.detach(), torch.cuda.max_memory_allocated() - base


@gpu
@needs_cuda
@pytest.mark.parametrize("ac", ["none", "full"])
def test_gpu_activation_offload_same_grads_less_memory(ac):
    from ftcore.offload import ActivationOffload
    from ftcore.parallel import apply_activation_checkpointing
    dev = torch.device("cuda")
    model = _mid_model(dev)
    apply_activation_checkpointing(model, ac)
    ids = torch.randint(0, 8192, (4, 2048), device=dev)
    ref_loss, ref_peak = _step_peak(model, ids)
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    off = ActivationOffload(dev, head=model.norm, max_inflight_bytes=256 << 20, prefetch_bytes=256 << 20)
    _step_peak(model, ids, off)  # warm the pinned-memory cache
    model.zero_grad(set_to_none=True)
    loss, peak = _step_peak(model, ids, off)
    got = [p.grad for p in model.parameters()]
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert all((a.float() - b.float()).norm() <= 1e-2 * b.float().norm() for a, b in zip(got, ref))  # SDPA bwd is not bitwise deterministic
    assert off.offloaded_bytes > 0 and not off.inflight and not off.ready
    mib = dict(peak=peak / 2**20, ref_peak=ref_peak / 2**20, offloaded=off.offloaded_bytes / 2**20)
    if ac == "none":  # ~1 GiB of block activations offloaded; at most 256 MiB each way in flight
        assert peak < ref_peak - off.offloaded_bytes / 3, mib
    else:  # AC keeps only the block inputs, and those move: a little less, never more
        assert peak <= 1.02 * ref_peak, mib


@gpu
@needs_cuda
def test_gpu_optimizer_in_backward_less_memory():
    from ftcore.optim import AdamW as OurAdamW
    dev = torch.device("cuda")
    ids = torch.randint(0, 8192, (1, 256), device=dev)  # few activations: the gradients dominate
    peaks = {}
    for mode in ("plain", "in_backward"):
        model = _mid_model(dev)
        params = [{"params": list(model.parameters())}]
        make = lambda groups: OurAdamW(groups, lr=1e-4, state_dtype=torch.bfloat16)
        opt = OptimizerInBackward(params, make) if mode == "in_backward" else make(params)
        _step_peak(model, ids, optimizer=opt)  # states allocated
        peaks[mode] = _step_peak(model, ids, optimizer=opt)[1]
    n_bytes = sum(p.numel() * 2 for p in model.parameters())  # one bf16 gradient per parameter
    assert peaks["in_backward"] < peaks["plain"] - 0.5 * n_bytes, peaks


GPU_SWITCHES = {
    "offload": dict(train=dict(activation_offload="true")),
    "offload-ac-mixed": dict(train=dict(activation_offload="true", activation_checkpointing="full", precision="bf16-mixed")),
    "inbwd-fsdp": dict(train=dict(optimizer_in_backward="true", fsdp="on")),
    "cpu-offload": dict(train=dict(cpu_offload="true")),
    "cpu-offload-inbwd-mixed": dict(train=dict(cpu_offload="true", optimizer_in_backward="true", precision="bf16-mixed")),
}


def _switch_reference(case: dict) -> dict:
    """The run a switch is compared with: the case's precision and checkpointing, and FSDP where the
    case has it (CPU offload is FSDP's), so that only the switch differs."""
    t = case["train"]
    ref = {k: v for k, v in t.items() if k in ("precision", "activation_checkpointing")}
    if "cpu_offload" in t or "fsdp" in t:
        ref["fsdp"] = "on"
    return {"train": ref}


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_SWITCHES))
def test_gpu_switches_same_losses(tiny, tmp_path, name):
    on_gpu = {"train": dict(device="cuda", loss="torch")}
    case = GPU_SWITCHES[name]
    ref = losses(run(tiny, tmp_path / "ref", on_gpu, _switch_reference(case)))
    got = losses(run(tiny, tmp_path / "got", on_gpu, case))
    assert got == pytest.approx(ref, rel=1e-4), (ref, got)


def test_gpu_switch_runs_are_configured_as_meant(tiny, tmp_path, monkeypatch):
    """The GPU test's plumbing on the CPU (its runs recorded, not run): both runs on CUDA, the
    reference with the case's precision, checkpointing and FSDP, the other with the switch too."""
    import sys
    configs = []

    def record(setup, run_dir, *more, **kw):
        configs.append(dict(v.split("=", 1) for v in overrides(setup, run_dir, *more, **kw)))
        return [{"loss": 1.0}]

    monkeypatch.setattr(sys.modules[__name__], "run", record)
    for name, case in GPU_SWITCHES.items():
        configs.clear()
        test_gpu_switches_same_losses(tiny, tmp_path, name)
        ref, got = configs
        assert ref["train.device"] == got["train.device"] == "cuda"
        for key, value in case["train"].items():
            assert got[f"train.{key}"] == value
            if key in ("precision", "activation_checkpointing"):
                assert ref[f"train.{key}"] == value, (name, key)
        assert ref.get("train.fsdp") == ("on" if {"cpu_offload", "fsdp"} & set(case["train"]) else None), name
        assert not {"activation_offload", "cpu_offload", "optimizer_in_backward"} & {k[6:] for k in ref}, name


@gpu
@needs_cuda
def test_gpu_fsdp_cpu_offload_less_memory():
    from ftcore.optim import build_optimizer
    from ftcore.parallel import apply_fsdp, init_distributed, shutdown
    cfg = load_config(None, ["train.grad_clip=0"])
    ids = torch.randint(0, 8192, (1, 256), device="cuda")
    peaks, step_losses = {}, {}
    try:
        d = init_distributed("cuda", need_group=True, cpu_collectives=True)
        for offload in (False, True):
            cfg.train.cpu_offload = offload
            base = torch.cuda.memory_allocated()
            model = _mid_model(d.device, dtype=torch.float32)
            apply_fsdp(model, d, "fp32", cpu_offload=offload)
            opt, _ = build_optimizer(model, cfg, d.device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = []
            for _ in range(3):
                loss, _ = model(ids, labels=ids)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                out.append(loss.item())
            peaks[offload], step_losses[offload] = torch.cuda.max_memory_allocated() - base, out
            del model, opt, loss
    finally:
        shutdown()
    assert step_losses[True] == pytest.approx(step_losses[False], rel=1e-5)
    n_params = 8192 * 1024 * 2 + 4 * (1024 * 1024 * 2 + 1024 * 256 * 2 + 3 * 1024 * 2816)
    # fp32 weights + grads + two states = 16 B/param on the GPU without offload, ~0 with it
    assert peaks[True] < peaks[False] - 8 * n_params, {k: v / 2**20 for k, v in peaks.items()}
