"""train.loss / train.precision = "auto": the CPU's native bf16 detected (and forced both ways),
the width rule, the choice printed and recorded, and kept on resume."""
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
from helpers import make_run_setup, run_overrides

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("hw"), hidden_size=hardware.BF16_MIN_HIDDEN_SIZE)


def test_forced_detection_both_ways(monkeypatch):
    monkeypatch.setenv("FTCORE_CPU_BF16", "1")
    assert hardware.cpu_native_bf16() == (True, "FTCORE_CPU_BF16=1")
    assert hardware.auto_precision(CPU, 128)[0] == "bf16-autocast"
    assert hardware.auto_precision(CPU, hardware.BF16_MIN_HIDDEN_SIZE)[0] == "bf16-autocast"
    # too narrow: the casts cost more than the faster multiply saves
    precision, why = hardware.auto_precision(CPU, hardware.BF16_MIN_HIDDEN_SIZE // 2)
    assert precision == "fp32" and "hidden size 32" in why
    monkeypatch.setenv("FTCORE_CPU_BF16", "0")
    assert hardware.auto_precision(CPU, 4096) == ("fp32", "FTCORE_CPU_BF16=0")
    monkeypatch.setenv("FTCORE_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="FTCORE_CPU_BF16 must be 0 or 1"):
        hardware.cpu_native_bf16()


@pytest.mark.parametrize("flags, expected", [({"avx512f", "amx_bf16", "amx_tile"}, ("AMX-BF16",)),
                                             ({"avx512f", "avx512_bf16"}, ("AVX512-BF16",)),
                                             ({"avx2", "fma"}, ())])
def test_detection_from_cpu_flags(monkeypatch, flags, expected):
    """/proc/cpuinfo's flags decide where the kernel gives them, whatever torch's probes say."""
    monkeypatch.delenv("FTCORE_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(hardware, "_proc_cpuinfo_flags", lambda: flags)
    hardware.cpu_bf16_features.cache_clear()
    try:
        assert hardware.cpu_bf16_features() == expected
        native, why = hardware.cpu_native_bf16()
        assert native == bool(expected)
        assert hardware.auto_precision(CPU, 512)[0] == ("bf16-autocast" if expected else "fp32")
        if not expected:
            assert why == "CPU has no AMX-BF16 or AVX512-BF16"
    finally:
        hardware.cpu_bf16_features.cache_clear()


@pytest.mark.parametrize("amx, avx512", [(True, False), (False, True), (False, False)])
def test_detection_from_torch_probes_without_proc_cpuinfo(monkeypatch, amx, avx512):
    monkeypatch.delenv("FTCORE_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512, raising=False)
    monkeypatch.setattr(hardware, "_proc_cpuinfo_flags", lambda: set())
    hardware.cpu_bf16_features.cache_clear()
    try:
        want = tuple(n for n, has in (("AMX-BF16", amx), ("AVX512-BF16", avx512)) if has)
        assert hardware.cpu_bf16_features() == want
        assert hardware.auto_precision(CPU, 512)[0] == ("bf16-autocast" if want else "fp32")
    finally:
        hardware.cpu_bf16_features.cache_clear()


def test_torch_probes_agree_with_proc_cpuinfo():
    if not hasattr(torch.cpu, "_is_amx_tile_supported") or not Path("/proc/cpuinfo").is_file():
        pytest.skip("needs torch's cpuinfo probes and /proc/cpuinfo to compare")
    flags = hardware._proc_cpuinfo_flags()
    assert torch.cpu._is_avx512_bf16_supported() == ("avx512_bf16" in flags)
    assert torch.cpu._is_amx_tile_supported() == ("amx_tile" in flags)


def test_resolve_auto_leaves_explicit_choices_alone(monkeypatch):
    monkeypatch.setenv("FTCORE_CPU_BF16", "1")
    t = Config().train
    assert (t.loss, t.precision) == ("auto", "auto")  # the defaults
    said = hardware.resolve_auto(t, CPU, 512)
    assert (t.loss, t.precision) == ("chunked", "bf16-autocast")
    assert said[0].startswith("train.loss = auto -> chunked") and said[1].startswith("train.precision = auto -> bf16-autocast")
    t.loss, t.precision = "torch", "fp32"
    assert hardware.resolve_auto(t, CPU, 512) == [] and (t.loss, t.precision) == ("torch", "fp32")
    cuda = hardware.auto_loss(torch.device("cuda"))[0]
    assert cuda == "triton"


def _train(args, native: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", FTCORE_CPU_BF16=native)
    return subprocess.run([sys.executable, "-m", "ftcore.cli", "train", "configs/tiny_cpu.toml", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def _recorded(run_dir: Path) -> tuple[str, str]:
    cfg = load_config(str(run_dir / "config.toml"))
    return cfg.train.loss, cfg.train.precision


def test_a_run_prints_and_records_the_choice_and_keeps_it_on_resume(tiny_setup, tmp_path):
    """Forced both ways on one machine: no native bf16 gives fp32, native bf16 gives autocast at
    the tiny model's width (BF16_MIN_HIDDEN_SIZE); each is printed once and written to config.toml; the two runs'
    losses agree as closely as fp32 and bf16 autocast do (tests/test_train.py); a resume keeps the
    recorded choice even where the machine would now choose otherwise."""
    losses = {}
    for native, expected in (("0", "fp32"), ("1", "bf16-autocast")):
        run = tmp_path / f"bf16-{native}"
        args = run_overrides(tiny_setup, run, train=dict(precision="auto", loss="auto", max_steps=6),
                             checkpoint=dict(every=3))
        p = _train(args, native)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.count("train.precision = auto -> " + expected) == 1, p.stdout[-2000:]
        assert p.stdout.count("train.loss = auto -> chunked") == 1
        assert _recorded(run) == ("chunked", expected)
        losses[native] = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in l]
    assert len(losses["0"]) == len(losses["1"]) == 6
    assert max(abs(a - b) / a for a, b in zip(losses["0"], losses["1"])) < 0.05, losses

    # the fp32 run again, from its step-3 checkpoint, on a "machine" with native bf16: it stays fp32
    run = tmp_path / "bf16-0"
    p = _train(run_overrides(tiny_setup, run, train=dict(precision="auto", loss="auto", max_steps=6),
                             checkpoint=dict(every=3)), "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stdout and "train.precision = auto" not in p.stdout
    assert _recorded(run) == ("chunked", "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_the_cpu_default_path_matches_the_reference_loss(precision):
    """The whole model with the auto-chosen CPU loss (labelled rows only) against the full-logits
    torch loss: loss and every gradient, fp32 <= 1e-5, bf16 autocast <= 1e-2 (norm-relative, the
    kernels' tolerances)."""
    import contextlib

    from helpers import randomize_, rel_err, tiny_config
    from ftcore.model import IGNORE_INDEX, Transformer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 131, (3, 40), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :30] = IGNORE_INDEX  # a prompt, then the completion
    results = {}
    for loss in ("torch", hardware.auto_loss(CPU)[0]):
        model = Transformer(tiny_config(), loss=loss)
        model.reset_buffers()
        randomize_(model, seed=0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision != "fp32" else contextlib.nullcontext()
        with autocast:
            loss_sum, n = model(ids, labels=labels)
        (loss_sum / n).backward()
        results[loss] = loss_sum.detach(), {k: p.grad for k, p in model.named_parameters()}
    (ref_loss, ref_grads), (loss, grads) = results["torch"], results["chunked"]
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert rel_err(loss, ref_loss) <= tol
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) <= tol, k
