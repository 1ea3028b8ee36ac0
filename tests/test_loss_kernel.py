"""The fused linear cross-entropy and the kernel registry.

CPU: the Triton kernel runs under the interpreter (conftest sets TRITON_INTERPRET=1 before
anything imports triton), on small odd shapes with blocks and chunks small enough that every loop
runs several times. `-m gpu`: the same on CUDA, at full vocabulary sizes.
"""
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ftcore import kernels
from ftcore.kernels import registry
from helpers import compile_for_gpu_or_skip, gpu, needs_cuda
from ftcore.kernels import get_loss, linear_cross_entropy
from ftcore.kernels.linear_cross_entropy import STATS, chunk_rows_for
from ftcore.kernels.testing import (KernelCheckError, check_loss_kernel, make_loss_inputs,
                                    reference_linear_cross_entropy, rel_err)

ROOT = Path(__file__).resolve().parents[1]

# chunks of 16 rows and vocab tiles of 64: every shape in SMALL_SHAPES spans several of both
SMALL = dict(chunk_rows=16, block_v=64)


def test_import_does_not_import_triton():
    code = "import sys, ftcore.kernels, ftcore.kernels.testing; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- correctness against the float64 reference (harness: ftcore.kernels.testing) -----------------

@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_matches_float64_reference(name):
    # fp32 <= 1e-5 and bf16 <= 1e-2 norm-relative; odd N, V not a multiple of the tile, H not a
    # power of 2; reduction sum and mean; with and without bias; some / no / one row labelled
    results = check_loss_kernel(partial(get_loss(name), **SMALL))
    assert len(results) == 3 * 2 * 2 * 2 * 3


@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_default_chunking_and_all_rows_labelled(name):
    # chunk sizes from the memory budget: the default gives one chunk (d_weight in one matmul);
    # a tiny budget gives chunks of 16 rows for fp32 (bf16 stays one chunk: all its logits fit in
    # budget + the fp32 accumulator it would otherwise need; see test_chunk_rows_from_memory_budget)
    fn = get_loss(name)
    check_loss_kernel(fn, shapes=[(37, 40, 300)], labelled=("all",), bias=(False,))
    assert chunk_rows_for(37, 300, 40, torch.float32, memory_budget=8 * 1024) == 16
    check_loss_kernel(partial(fn, memory_budget=8 * 1024), shapes=[(37, 40, 300)],
                      labelled=("all",), bias=(True,))


@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_z_loss_and_label_smoothing(name):
    check_loss_kernel(partial(get_loss(name), **SMALL), shapes=[(67, 48, 300), (1, 24, 5)],
                      z_loss=1e-3, label_smoothing=0.1, bias=(True,), labelled=("some", "none"))


def test_other_ignore_index_and_3d_input():
    hidden, weight, labels, _ = make_loss_inputs(40, 32, 100, labelled="some", ignore_index=-1)
    ref = reference_linear_cross_entropy(hidden.double(), weight.double(), labels, ignore_index=-1)
    out = linear_cross_entropy(hidden.view(4, 10, 32), weight, labels.view(4, 10), ignore_index=-1,
                               reduction="sum", **SMALL)
    assert rel_err(out, ref) < 1e-5


def test_no_labelled_row_is_zero_connected_and_finite():
    for reduction in ("sum", "mean"):
        for name in ("triton", "chunked"):
            hidden, weight, labels, bias = make_loss_inputs(9, 16, 50, labelled="none", bias=True)
            for t in (hidden, weight, bias):
                t.requires_grad_()
            loss = get_loss(name)(hidden, weight, labels, bias=bias, reduction=reduction)
            assert loss.requires_grad and loss.item() == 0.0  # connected: FSDP ranks all run backward
            loss.backward()
            for t in (hidden, weight, bias):
                assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.slow
def test_compile_loss():
    # torch.compile of the reference (inductor needs a C++ compiler on CPU: gcc); one small case
    check_loss_kernel(get_loss("compile"), shapes=[(33, 40, 129)], dtypes=(torch.float32,),
                      reductions=("sum",), bias=(False,), labelled=("some",))


def test_torch_reference_mean_of_nothing_is_zero():
    hidden, weight, labels, _ = make_loss_inputs(5, 8, 11, labelled="none")
    assert get_loss("torch")(hidden, weight, labels, reduction="mean").item() == 0.0


_COMPILE_FOR_GPU = """
from ftcore.kernels.cross_entropy_triton import _softmax_xent_grad_kernel as kernel
builds = []
for dtype in ("*bf16", "*fp32"):
    for flags in ((False, False, True), (True, True, True), (False, False, False)):
        sig = dict(logits_ptr=dtype, stride_row="i64", labels_ptr="*i64", loss_ptr="*fp32", V="i32",
                   grad_scale="fp32", z_loss="fp32", smoothing="fp32", BLOCK_V="constexpr",
                   HAS_Z_LOSS="constexpr", HAS_SMOOTHING="constexpr", WRITE_GRAD="constexpr")
        consts = dict(BLOCK_V=4096, HAS_Z_LOSS=flags[0], HAS_SMOOTHING=flags[1], WRITE_GRAD=flags[2])
        builds.append((kernel, sig, consts))
"""


def test_kernel_compiles_for_gpu_without_one():
    compile_for_gpu_or_skip(_COMPILE_FOR_GPU)


# --- ignored rows cost nothing ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_work_scales_with_labelled_rows(name):
    N, H, V = 64, 32, 200
    fn = partial(get_loss(name), **SMALL)
    for fraction in (1.0, 0.25, 1 / 64, 0.0):
        hidden, weight, labels, _ = make_loss_inputs(N, H, V, labelled=fraction)
        hidden.requires_grad_(), weight.requires_grad_()
        n = int((labels != -100).sum())
        before = STATS["rows_through_kernel"]
        with FlopCounterMode(display=False) as flops:
            fn(hidden, weight, labels).backward()
        # three matmuls per labelled row (logits, d_hidden, d_weight), none for the others
        assert flops.get_total_flops() == 6 * n * H * V
        if name == "triton":
            assert STATS["rows_through_kernel"] - before == n


@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_no_grad_and_frozen_weight_skip_gradient_matmuls(name):
    N, H, V = 32, 24, 100
    fn = partial(get_loss(name), **SMALL)
    hidden, weight, labels, _ = make_loss_inputs(N, H, V, labelled="all")
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        evaluated = fn(hidden, weight, labels)
    assert flops.get_total_flops() == 2 * N * H * V  # evaluation: logits only
    hidden.requires_grad_()
    with FlopCounterMode(display=False) as flops:
        loss = fn(hidden, weight, labels)  # LoRA-style frozen lm_head
        loss.backward()
    assert flops.get_total_flops() == 4 * N * H * V and weight.grad is None
    assert torch.equal(loss.detach(), evaluated)


@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_autocast_runs_in_the_autocast_dtype(name):
    # fp32 parameters under bf16 autocast: the lm_head runs in bf16, gradients come back fp32
    hidden, weight, labels, _ = make_loss_inputs(33, 40, 129, labelled="some")
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = get_loss(name)(hidden, weight, labels, reduction="mean", **SMALL)
    loss.backward()
    h, w = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight))
    ref = reference_linear_cross_entropy(h, w, labels, reduction="mean")
    ref.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert rel_err(loss, ref) < 1e-2
    assert rel_err(hidden.grad, h.grad) < 1e-2 and rel_err(weight.grad, w.grad) < 1e-2


def test_chunk_rows_from_memory_budget():
    V, H = 128256, 2048
    # workload A at fraction 0.25: 2048 rows x 501 KiB of bf16 logits fit in budget + fp32 accumulator
    assert chunk_rows_for(2048, V, H, torch.bfloat16) == 2048
    rows = chunk_rows_for(8192, V, H, torch.bfloat16)
    assert rows % 16 == 0 and rows * (V * 2 + 4 * H) <= 256 * 2**20 < (rows + 16) * (V * 2 + 4 * H)
    assert chunk_rows_for(8192, V, H, torch.bfloat16, memory_budget=1) == 16  # floor, never 0


def test_bad_arguments_say_what():
    hidden, weight, labels, _ = make_loss_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="bfloat16"):
        linear_cross_entropy(hidden, weight.bfloat16(), labels)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, labels, _ = make_loss_inputs(4, 8, 10, labelled="all")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_cross_entropy(hidden, weight, labels, impl="triton")


# --- registry and harness ------------------------------------------------------------------------

def test_registry_and_user_kernel():
    assert {"torch", "chunked", "triton", "compile"} <= set(kernels.available_losses())
    with pytest.raises(ValueError, match="unknown loss kernel 'nope'.*chunked"):
        get_loss("nope")

    calls = []

    def factory():  # lazy: built on first use, once
        calls.append(1)
        return kernels.torch_linear_cross_entropy

    kernels.register_loss("user-test", factory, lazy=True)
    assert calls == []
    assert get_loss("user-test") is get_loss("user-test") and calls == [1]
    check_loss_kernel(get_loss("user-test"), shapes=[(7, 8, 13)], dtypes=(torch.float32,))

    # the README's example of a user kernel passes the harness as written
    def my_loss(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum"):
        keep = labels != ignore_index                       # no logits for prompt tokens
        logits = torch.nn.functional.linear(hidden[keep], weight, bias).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum")
        return loss / keep.sum().clamp(min=1) if reduction == "mean" else loss

    check_loss_kernel(my_loss, shapes=[(33, 40, 129)])

    # swapping only the per-chunk step keeps gathering, chunking and gradients
    from ftcore.kernels.linear_cross_entropy import STEPS, softmax_xent_grad_torch_
    STEPS["user-test"] = softmax_xent_grad_torch_
    def via_step(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum"):
        return linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, bias,
                                    impl="user-test", chunk_rows=4)

    check_loss_kernel(via_step, shapes=[(7, 8, 13)], dtypes=(torch.float32,), bias=(False,),
                      reductions=("mean",))
    del STEPS["user-test"]

    kernels.register_kernel("rmsnorm", "user-test", torch.nn.functional.rms_norm)
    assert kernels.get_kernel("rmsnorm", "user-test") is torch.nn.functional.rms_norm
    assert kernels.available_kernels("rmsnorm") == ["torch", "triton", "user-test"]
    del registry._KERNELS[("loss", "user-test")], registry._KERNELS[("rmsnorm", "user-test")]


class _GradsInForwardIgnoringGradOutput(torch.autograd.Function):
    """The classic bug of a grads-in-forward loss: backward forgets to scale by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction):
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = kernels.torch_linear_cross_entropy(h, w, labels, reduction=reduction)
            ctx.grads = torch.autograd.grad(loss, (h, w))
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        return *ctx.grads, None, None


def test_harness_catches_broken_kernels():
    ref = kernels.torch_linear_cross_entropy

    def ignores_grad_output(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum"):
        return _GradsInForwardIgnoringGradOutput.apply(hidden, weight, labels, reduction)

    def mean_over_all_rows(hidden, weight, labels, bias=None, ignore_index=-100, reduction="sum"):
        loss = ref(hidden, weight, labels, bias, ignore_index, "sum")
        return loss / labels.numel() if reduction == "mean" else loss

    def detached_when_empty(hidden, weight, labels, bias=None, **kw):
        if (labels == -100).all():
            return torch.zeros(())
        return ref(hidden, weight, labels, bias, **kw)

    small = dict(shapes=[(7, 8, 13)], dtypes=(torch.float32,), bias=(False,))
    with pytest.raises(KernelCheckError, match="FAIL.*mean"):
        check_loss_kernel(mean_over_all_rows, **small)
    with pytest.raises(KernelCheckError, match="not connected"):
        check_loss_kernel(detached_when_empty, **small)
    with pytest.raises(KernelCheckError, match="d_hidden=.*>"):
        check_loss_kernel(ignores_grad_output, **small)

    # versus=: judged against the baseline's own error (what the GPU tests do at full size)
    results = check_loss_kernel(partial(get_loss("chunked"), chunk_rows=16), shapes=[(64, 32, 200)],
                                dtypes=(torch.bfloat16,), labelled=("some", "all"), versus=ref,
                                tol=1e-3)
    assert all(r.limits["d_weight"] > 1e-3 for r in results)


# --- benchmark ---------------------------------------------------------------------------------

def test_bench_smoke(tmp_path):
    out = tmp_path / "loss.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "bench/bench_loss.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"floor", "triton", "chunked", "torch"} <= methods
    for r in rows:
        if r["method"] in ("triton", "chunked", "torch"):
            assert r["ms"] > 0 and r["err_loss"] < 1e-2 and r["err_d_weight"] < 1e-2
    assert "| ftcore triton |" in proc.stdout


# --- GPU (pytest -m gpu) ---------------------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["triton", "chunked"])
def test_gpu_small_shapes(name):
    check_loss_kernel(partial(get_loss(name), **SMALL), device="cuda")
    check_loss_kernel(get_loss(name), device="cuda", z_loss=1e-3, label_smoothing=0.1)


@gpu
@needs_cuda
def test_gpu_fp32_is_ieee_even_with_tf32_enabled():
    # TF32 would give ~1e-3 here; the loss must force IEEE fp32 matmuls for fp32 inputs
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_loss_kernel(get_loss("triton"), device="cuda", shapes=[(1027, 1000, 32003)],
                          dtypes=(torch.float32,), reductions=("sum",), bias=(False,),
                          labelled=("some",))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@gpu
@needs_cuda
@pytest.mark.parametrize("V", [128256, 262144])
def test_gpu_full_vocab_bf16_vs_plain_torch(V):
    # |ref - ours| <= |ref - plain torch bf16| + tol, loss and gradients; 4099 rows, all or
    # "some" (60% prompt + scattered) labelled
    fn = get_loss("triton")
    for kw in (dict(), dict(chunk_rows=1000)):  # one chunk (the default here), then five
        check_loss_kernel(partial(fn, **kw), device="cuda", shapes=[(4099, 2048, V)],
                          dtypes=(torch.bfloat16,), reductions=("mean",), bias=(False,),
                          labelled=("some", "all"), versus=get_loss("torch"), tol=1e-3)
        torch.cuda.empty_cache()


@gpu
@needs_cuda
def test_gpu_rows_times_vocab_beyond_int32():
    # one chunk of 8193 x 262144 = 2^31 + 262144 logits: the kernel's offsets must be int64
    n, V = 8193, 262144
    assert n * V > 2**31
    check_loss_kernel(partial(get_loss("triton"), chunk_rows=n), device="cuda",
                      shapes=[(n, 256, V)], dtypes=(torch.bfloat16,), reductions=("sum",),
                      bias=(False,), labelled=("all",))
    torch.cuda.empty_cache()


@gpu
@needs_cuda
def test_gpu_fp32_accumulation_of_bf16_products():
    from ftcore.kernels.linear_cross_entropy import _addmm_fp32_, _has_mixed_addmm
    assert _has_mixed_addmm(), "this torch lacks addmm(out_dtype=float32): chunk products round"
    a = torch.randn(4096, 512, device="cuda").bfloat16()
    b = torch.randn(512, 256, device="cuda").bfloat16()
    acc = torch.ones(4096, 256, device="cuda")
    _addmm_fp32_(acc, a, b)
    exact = 1 + a.double() @ b.double()
    assert rel_err(acc, exact) < 1e-6  # a bf16-rounded product would be ~1e-3


@gpu
@needs_cuda
def test_gpu_one_host_sync():
    # the nonzero that sizes the gather; nothing else in forward or backward waits on the GPU
    hidden, weight, labels, _ = make_loss_inputs(1000, 256, 5000, device="cuda", labelled="some")
    hidden.requires_grad_(), weight.requires_grad_()
    get_loss("triton")(hidden, weight, labels)  # compile the kernel first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_loss("triton")(hidden, weight, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
