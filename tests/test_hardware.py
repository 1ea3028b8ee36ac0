"""train.loss / train.precision = "auto": the CPU probe (forced fast and slow, cached per machine
and shape), the flags as evidence only, the choice printed and recorded, and kept on resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftcore import hardware
from ftcore.config import Config, load_config
from helpers import BF16_U, bf16_loss_bound, make_run_setup, run_overrides

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


SHAPE = hardware.MatmulShape(128, 384, 8192)  # the quickstart's model and micro-batch


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("hw"), hidden_size=64)


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """A cache of its own, and a probe whose result the test forces: (fp32_ms, bf16_ms), counted."""
    monkeypatch.delenv("FTCORE_CPU_BF16", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    result = {"ms": (10.0, 5.0)}

    def fake_timer(h, i, rows):
        calls.append((h, i, rows))
        return result["ms"]

    monkeypatch.setattr(hardware, "time_bf16_vs_fp32", fake_timer)
    return result, calls


def test_forced_both_ways(monkeypatch, probe_cache):
    _, calls = probe_cache
    monkeypatch.setenv("FTCORE_CPU_BF16", "1")
    assert hardware.auto_precision(CPU, SHAPE) == ("bf16-autocast", "FTCORE_CPU_BF16=1")
    monkeypatch.setenv("FTCORE_CPU_BF16", "0")
    assert hardware.auto_precision(CPU, SHAPE) == ("fp32", "FTCORE_CPU_BF16=0")
    assert calls == []  # forced: nothing measured
    monkeypatch.setenv("FTCORE_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="FTCORE_CPU_BF16 must be 0 or 1"):
        hardware.auto_precision(CPU, SHAPE)


@pytest.mark.parametrize("ms, expected", [((10.0, 4.5), "bf16-autocast"),   # AMX: bf16 much faster
                                          ((10.0, 7.0), "bf16-autocast"),   # just at the bound
                                          ((10.0, 8.0), "fp32"),            # faster, not enough for a step
                                          ((10.0, 17.5), "fp32")])          # AVX512-BF16 without AMX
def test_the_probe_decides(probe_cache, ms, expected):
    result, calls = probe_cache
    result["ms"] = ms
    precision, why = hardware.auto_precision(CPU, SHAPE)
    assert precision == expected
    assert f"{ms[1] / ms[0]:.2f}x fp32's time" in why and "probe just now" in why
    assert calls == [(128, 384, 8192)]


def test_the_probe_is_cached_per_machine_and_shape(probe_cache):
    result, calls = probe_cache
    assert hardware.auto_precision(CPU, SHAPE)[0] == "bf16-autocast"
    result["ms"] = (10.0, 20.0)  # a second measurement would say otherwise: it is not taken
    precision, why = hardware.auto_precision(CPU, SHAPE)
    assert precision == "bf16-autocast" and "cached in" in why and len(calls) == 1
    cache = json.loads(hardware.probe_cache_path().read_text())
    assert list(cache) == [hardware.probe_key(SHAPE)]
    assert cache[hardware.probe_key(SHAPE)]["bf16_ms"] == 5.0
    # another shape is measured on its own
    assert hardware.auto_precision(CPU, hardware.MatmulShape(32, 64, 512))[0] == "fp32"
    assert len(calls) == 2 and len(json.loads(hardware.probe_cache_path().read_text())) == 2
    # so is another thread count (the key names it)
    assert hardware.probe_key(SHAPE, threads=1) != hardware.probe_key(SHAPE, threads=2)


def test_an_unreadable_cache_is_measured_again(probe_cache):
    _, calls = probe_cache
    path = hardware.probe_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert hardware.auto_precision(CPU, SHAPE)[0] == "bf16-autocast" and len(calls) == 1
    assert hardware.probe_key(SHAPE) in json.loads(path.read_text())


def test_the_probe_rows_are_capped_for_wide_models():
    assert hardware.probe_rows(SHAPE) == 8192  # the quickstart's micro-batch, whole
    rows = hardware.probe_rows(hardware.MatmulShape(4096, 14336, 8192))  # Llama-3-8B: capped
    assert rows == hardware.PROBE_MIN_ROWS
    assert 6 * 576 * 1536 * hardware.probe_rows(hardware.MatmulShape(576, 1536, 8192)) <= hardware.PROBE_FLOP


def test_the_real_probe_times_both_precisions(monkeypatch, tmp_path):
    """No timing is asserted (timed asserts are flaky): the probe runs, measures both, caches."""
    monkeypatch.delenv("FTCORE_CPU_BF16", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fp32_ms, bf16_ms = hardware.time_bf16_vs_fp32(64, 128, 256, rounds=1)
    assert fp32_ms > 0 and bf16_ms > 0
    probe, cached = hardware.bf16_probe(hardware.MatmulShape(64, 128, 256))
    assert not cached and probe.rows == 256 and probe.fp32_ms > 0
    assert hardware.bf16_probe(hardware.MatmulShape(64, 128, 256)) == (probe, True)


@pytest.mark.parametrize("flags, expected", [({"avx512f", "amx_bf16", "amx_tile"}, ("AMX-BF16",)),
                                             ({"avx512f", "avx512_bf16"}, ("AVX512-BF16",)),
                                             ({"avx2", "fma"}, ())])
def test_flags_from_proc_cpuinfo_are_named_not_obeyed(monkeypatch, probe_cache, flags, expected):
    """/proc/cpuinfo's flags name the evidence (and key the cache), whatever torch's probes say;
    the measurement decides: a CPU with the flags whose bf16 is slow gets fp32."""
    result, _ = probe_cache
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(hardware, "_proc_cpuinfo_flags", lambda: flags)
    hardware.cpu_bf16_features.cache_clear()
    try:
        assert hardware.cpu_bf16_features() == expected
        result["ms"] = (10.0, 17.5)
        precision, why = hardware.auto_precision(CPU, SHAPE)
        assert precision == "fp32"
        assert ("CPU has " + (" and ".join(expected) or "no AMX-BF16 or AVX512-BF16")) in why
        assert (" and ".join(expected) or "no bf16 flags") in hardware.probe_key(SHAPE)
    finally:
        hardware.cpu_bf16_features.cache_clear()


@pytest.mark.parametrize("amx, avx512", [(True, False), (False, True), (False, False)])
def test_flags_from_torch_probes_without_proc_cpuinfo(monkeypatch, amx, avx512):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512, raising=False)
    monkeypatch.setattr(hardware, "_proc_cpuinfo_flags", lambda: set())
    hardware.cpu_bf16_features.cache_clear()
    try:
        want = tuple(n for n, has in (("AMX-BF16", amx), ("AVX512-BF16", avx512)) if has)
        assert hardware.cpu_bf16_features() == want
    finally:
        hardware.cpu_bf16_features.cache_clear()


def test_torch_probes_agree_with_proc_cpuinfo():
    if not hasattr(torch.cpu, "_is_amx_tile_supported") or not Path("/proc/cpuinfo").is_file():
        pytest.skip("needs torch's cpuinfo probes and /proc/cpuinfo to compare")
    flags = hardware._proc_cpuinfo_flags()
    assert torch.cpu._is_avx512_bf16_supported() == ("avx512_bf16" in flags)
    assert torch.cpu._is_amx_tile_supported() == ("amx_tile" in flags)


def test_resolve_auto_leaves_explicit_choices_alone(probe_cache):
    t = Config().train
    assert (t.loss, t.precision) == ("auto", "auto")  # the defaults
    said = hardware.resolve_auto(t, CPU, SHAPE)
    assert (t.loss, t.precision) == ("chunked", "bf16-autocast")
    assert said[0].startswith("train.loss = auto -> chunked") and said[1].startswith("train.precision = auto -> bf16-autocast")
    t.loss, t.precision = "torch", "fp32"
    assert hardware.resolve_auto(t, CPU, SHAPE) == [] and (t.loss, t.precision) == ("torch", "fp32")
    cuda = hardware.auto_loss(torch.device("cuda"))[0]
    assert cuda == "triton"


def _train(args, cache_home: Path):
    env = {k: v for k, v in os.environ.items() if k != "FTCORE_CPU_BF16"}
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(cache_home))
    return subprocess.run([sys.executable, "-m", "ftcore.cli", "train", "configs/tiny_cpu.toml", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def _machine_with_probe(root: Path, fp32_ms: float, bf16_ms: float) -> Path:
    """A cache home whose probe result for the tiny run's shape (hidden 64 x 128, micro-batch 2 x
    128, one thread) says bf16 is fast or slow on "this machine"."""
    key = hardware.probe_key(hardware.MatmulShape(64, 128, 2 * 128), threads=1)
    path = root / "ftcore" / "cpu_bf16_probe.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({key: dict(fp32_ms=fp32_ms, bf16_ms=bf16_ms, rows=256, measured="2026-12-06")}))
    return root


def _recorded(run_dir: Path) -> tuple[str, str]:
    cfg = load_config(str(run_dir / "config.toml"))
    return cfg.train.loss, cfg.train.precision


@pytest.mark.slow
def test_a_run_prints_and_records_the_choice_and_keeps_it_on_resume(tiny_setup, tmp_path):
    """The probe forced slow gives fp32, forced fast gives bf16 autocast (through the cache a real
    run reads); each is printed once and written to config.toml; the two runs' losses agree as
    closely as fp32 and bf16 autocast do (tests/test_train.py); a resume keeps the recorded choice
    even where the machine would now choose otherwise."""
    slow = _machine_with_probe(tmp_path / "slow-bf16", 10.0, 15.0)
    fast = _machine_with_probe(tmp_path / "fast-bf16", 10.0, 4.0)
    losses = {}
    for machine, expected in ((slow, "fp32"), (fast, "bf16-autocast")):
        run = tmp_path / f"run-{expected}"
        args = run_overrides(tiny_setup, run, train=dict(precision="auto", loss="auto", max_steps=6),
                             checkpoint=dict(every=3))
        p = _train(args, machine)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.count("train.precision = auto -> " + expected) == 1, p.stdout[-2000:]
        assert "cached in " + str(machine) in p.stdout
        assert p.stdout.count("train.loss = auto -> chunked") == 1
        assert _recorded(run) == ("chunked", expected)
        losses[expected] = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
                            if '"loss"' in l]
    assert len(losses["fp32"]) == len(losses["bf16-autocast"]) == 6
    assert max(abs(a - b) / a for a, b in zip(losses["fp32"], losses["bf16-autocast"])) < bf16_loss_bound(2), losses

    # the fp32 run again, from its step-3 checkpoint, on a "machine" where bf16 is fast: it stays fp32
    run = tmp_path / "run-fp32"
    p = _train(run_overrides(tiny_setup, run, train=dict(precision="auto", loss="auto", max_steps=6),
                             checkpoint=dict(every=3)), fast)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stdout and "train.precision = auto" not in p.stdout
    assert _recorded(run) == ("chunked", "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_the_cpu_default_path_matches_the_reference_loss(precision):
    """The whole model with the auto-chosen CPU loss (labelled rows only), loss and every gradient,
    against the model in float64 (norm-relative errors). fp32: within the kernels' fp32 tolerance,
    1e-5 (fp32 is IEEE on every CPU; only the order of sums differs). bf16 autocast: how a CPU does
    bf16 (AMX, AVX512-BF16, emulated on AVX2 only) decides how each product is rounded, so no
    constant holds; what holds everywhere is that ours adds no more error than plain torch's own
    under the same autocast on the same CPU, plus two roundings (2u, u = 2^-8): the chunked loss
    rounds the labelled rows' logits and their gradient once each where torch rounds the full ones."""
    import contextlib

    from helpers import randomize_, rel_err, tiny_config
    from ftcore.model import IGNORE_INDEX, Transformer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 131, (3, 40), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :30] = IGNORE_INDEX  # a prompt, then the completion

    def loss_and_grads(loss: str, dtype: torch.dtype, autocast) -> dict[str, torch.Tensor]:
        model = Transformer(tiny_config(), loss=loss)
        model.reset_buffers()
        randomize_(model, seed=0).to(dtype)
        with autocast:
            loss_sum, n = model(ids, labels=labels)
        (loss_sum / n).backward()
        return {"loss": loss_sum.detach(), **{k: p.grad for k, p in model.named_parameters()}}

    reference = loss_and_grads("torch", torch.float64, contextlib.nullcontext())
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision != "fp32" else contextlib.nullcontext
    ours = loss_and_grads(hardware.auto_loss(CPU)[0], torch.float32, autocast())
    assert hardware.auto_loss(CPU)[0] == "chunked"
    if precision == "fp32":
        limits = {k: 1e-5 for k in reference}
    else:
        plain = loss_and_grads("torch", torch.float32, autocast())
        limits = {k: rel_err(plain[k], reference[k]) + 2 * BF16_U for k in reference}
    for k in reference:
        assert rel_err(ours[k], reference[k]) <= limits[k], (k, rel_err(ours[k], reference[k]), limits[k])
