"""Fused layer kernels (rmsnorm, rope, swiglu) and the model built with them.

CPU: the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1 before anything
imports triton), on small odd shapes (rows not a multiple of the tile, hidden sizes and half head
dims not powers of 2), forward and backward against float64 through ftcore.kernels.testing:
fp32 <= 1e-5, bf16 <= 1e-2 norm-relative. `-m gpu` (with FTCORE_TEST_CUDA=1): the Llama-3.2-1B
sizes of workload B (hidden 2048, 4 x 2048 tokens, 32 query / 8 key-value heads of 64, MLP 8192),
judged against plain torch's own error in the same dtype.
"""
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from ftcore.config import ConfigError, load_config, to_toml
from ftcore.kernels import available_kernels, get_kernel
from ftcore.kernels.testing import (check_kernel, reference_rms_norm, reference_rope,
                                    reference_swiglu, rel_err)
from ftcore.model import Transformer, apply_rope_qk, rms_norm, swiglu

from helpers import compile_for_gpu_or_skip, gpu, needs_cuda, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ALL_TRITON = {"rmsnorm": "triton", "rope": "triton", "swiglu": "triton"}
DTYPES = (torch.float32, torch.bfloat16)


# --- cases ---------------------------------------------------------------------------------------

def rmsnorm_cases(shapes, dtypes=DTYPES, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        H = shape[-1]
        for dtype in dtypes:
            x = (2.0 * torch.randn(shape, generator=g, device=device)).to(dtype)
            w = (1.0 + 0.1 * torch.randn(H, generator=g, device=device)).to(dtype)
            yield f"x{tuple(shape)} {str(dtype)[6:]}", (x, w), {"eps": 1e-5}


def swiglu_cases(shapes, dtypes=DTYPES, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        for dtype in dtypes:
            gate = (2.0 * torch.randn(shape, generator=g, device=device)).to(dtype)
            up = torch.randn(shape, generator=g, device=device).to(dtype)
            yield f"{tuple(shape)} {str(dtype)[6:]}", (gate, up), {}


def cos_sin(B, T, D, dtype, device="cpu", layout="model", theta=10000.0):
    """cos/sin as the model builds them (B, 1, T, D), each row at its own start position; or
    (1, 1, T, D) / (T, D), which broadcast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=device).float() / D)
    pos = torch.arange(T, device=device)[None, :] + 3 * torch.arange(B, device=device)[:, None]
    if layout != "model":
        pos = pos[:1]
    emb = torch.cat(((pos[..., None] * inv_freq),) * 2, dim=-1)[:, None]   # (B or 1, 1, T, D)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if layout == "2d":
        cos, sin = cos[0, 0], sin[0, 0]
    return cos, sin


def rope_cases(shapes, dtypes=DTYPES, device="cpu", seed=0, layouts=("model",), cos_dtype=None):
    """q, k laid out as the model makes them: (B, T, H, D) projections viewed as (B, H, T, D)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for (B, T, Hq, Hk, D) in shapes:
        for dtype in dtypes:
            for layout in layouts:
                q = torch.randn(B, T, Hq, D, generator=g, device=device).to(dtype).transpose(1, 2)
                k = torch.randn(B, T, Hk, D, generator=g, device=device).to(dtype).transpose(1, 2)
                cos, sin = cos_sin(B, T, D, cos_dtype or dtype, device, layout)
                name = f"B={B} T={T} Hq={Hq} Hk={Hk} D={D} {str(dtype)[6:]} cos {layout}"
                yield name, (q, k), {"cos": cos, "sin": sin}


def joined(rope_fn):
    """q and k rotated, as one tensor: the harness compares one output and backpropagates one
    upstream gradient (here not in q's memory layout, so the backward sees other strides)."""
    def fn(q, k, cos, sin):
        q_out, k_out = rope_fn(q, k, cos, sin)
        return torch.cat([q_out.flatten(), k_out.flatten()])
    return fn


RMSNORM_SHAPES = [(37, 48), (67, 72), (1, 200), (2, 5, 200)]
SWIGLU_SHAPES = [(37, 200), (3, 5, 72), (1, 48)]
ROPE_SHAPES = [(2, 7, 4, 2, 16), (1, 5, 3, 1, 24), (2, 3, 2, 2, 64)]


# --- each kernel against float64 ----------------------------------------------------------------

@pytest.mark.parametrize("tiles", [{}, {"block_rows": 8, "programs": 3}], ids=["default", "small-tiles"])
def test_rmsnorm_matches_float64(tiles):
    # small tiles: 8-row tiles over 37/67 rows (a partial last tile), 3 backward programs each
    # walking several tiles, so the weight gradient is a sum of partial sums
    results = check_kernel(partial(get_kernel("rmsnorm", "triton"), **tiles), reference_rms_norm,
                           rmsnorm_cases(RMSNORM_SHAPES), grad_names=["dx", "dweight"])
    assert len(results) == len(RMSNORM_SHAPES) * 2


def test_rmsnorm_mixed_dtypes_follow_torch_promotion():
    # under autocast the residual is fp32; with a bf16 input and an fp32 weight the output is fp32
    # (as weight * bf16 is in torch) and each gradient comes back in its own input's dtype
    x = torch.randn(9, 40).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(40)).requires_grad_()
    y = get_kernel("rmsnorm", "triton")(x, w, 1e-6)
    ref = rms_norm(x.detach(), w.detach(), 1e-6)
    assert y.dtype == ref.dtype == torch.float32 and rel_err(y, ref) < 1e-2
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    check_kernel(get_kernel("rmsnorm", "triton"), reference_rms_norm,
                 [("bf16 x, fp32 weight", (x.detach(), w.detach()), {"eps": 1e-6})])


@pytest.mark.parametrize("block", [None, 64], ids=["default", "block64"])
def test_swiglu_matches_float64(block):
    results = check_kernel(partial(get_kernel("swiglu", "triton"), block=block), reference_swiglu,
                           swiglu_cases(SWIGLU_SHAPES), grad_names=["dgate", "dup"])
    assert len(results) == len(SWIGLU_SHAPES) * 2


@pytest.mark.parametrize("block_rows", [None, 4], ids=["default", "4-rows"])
def test_rope_matches_float64(block_rows):
    # head dims 16 / 24 / 64 (half 12: not a power of 2), GQA (fewer k heads), cos/sin per row
    # of the batch as in the model, or broadcast from (1, 1, T, D) and (T, D)
    fn = joined(partial(get_kernel("rope", "triton"), block_rows=block_rows))
    cases = list(rope_cases(ROPE_SHAPES, layouts=("model", "1-1-T-D", "2d")))
    results = check_kernel(fn, joined(reference_rope), cases, grad_names=["dq", "dk"])
    assert len(results) == len(ROPE_SHAPES) * 2 * 3


def test_rope_autocast_dtypes_and_layouts():
    # autocast: bf16 q, k and fp32 cos/sin -> fp32 out (as the eager model), bf16 gradients
    fn = get_kernel("rope", "triton")
    check_kernel(joined(fn), joined(reference_rope),
                 rope_cases([(2, 5, 4, 2, 24)], dtypes=(torch.bfloat16,), cos_dtype=torch.float32))
    (_, (q, k), kw), = rope_cases([(2, 5, 4, 2, 24)], dtypes=(torch.bfloat16,),
                                  cos_dtype=torch.float32)
    q, k = q.requires_grad_(), k.requires_grad_()
    q_out, k_out = fn(q, k, **kw)
    q_ref, k_ref = apply_rope_qk(q.detach(), k.detach(), **kw)
    assert q_out.dtype == q_ref.dtype == torch.float32
    assert q_out.stride() == q.stride()  # written in the input's (B, T, H, D) memory layout
    assert rel_err(q_out, q_ref) < 1e-6 and rel_err(k_out, k_ref) < 1e-6
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16
    # a non-dense input (a slice of a bigger projection) is copied, not misread
    qkv = torch.randn(2, 5, 8, 24)
    q, k = qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2)
    cos, sin = cos_sin(2, 5, 24, torch.float32)
    for ours, ref in zip(fn(q, k, cos, sin), apply_rope_qk(q, k, cos, sin)):
        assert rel_err(ours, ref) < 1e-6
    with pytest.raises(ValueError, match="no gradient for cos"):
        fn(q, k, cos.requires_grad_(), sin)


def test_fp32_matches_the_model_torch_functions_closely():
    # the torch functions are what the model runs by default: in fp32 the fused kernels give the
    # same numbers up to rounding order
    (_, (x, w), kw), = rmsnorm_cases([(33, 72)], dtypes=(torch.float32,))
    assert rel_err(get_kernel("rmsnorm", "triton")(x, w, **kw), rms_norm(x, w, **kw)) < 1e-6
    (_, (g, u), _), = swiglu_cases([(33, 72)], dtypes=(torch.float32,))
    assert rel_err(get_kernel("swiglu", "triton")(g, u), swiglu(g, u)) < 1e-6


def test_triton_kernels_on_cpu_without_interpreter_are_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        get_kernel("rmsnorm", "triton")(x, torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        get_kernel("swiglu", "triton")(x, x)


def test_registry_and_lazy_import():
    for kind in ("rmsnorm", "rope", "swiglu"):
        assert {"torch", "triton"} <= set(available_kernels(kind))
    assert get_kernel("rmsnorm", "torch") is rms_norm and get_kernel("swiglu", "torch") is swiglu
    # building the default model and running it never imports triton
    code = ("import sys, torch; from ftcore.model import Transformer, ModelConfig; "
            "m = Transformer(ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=32, "
            "num_layers=1, num_heads=2, num_kv_heads=2)); m(torch.zeros(1, 3, dtype=torch.long)); "
            "assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


_COMPILE_FOR_GPU = """
from ftcore.kernels import rmsnorm, rope, swiglu
builds = []
for t in ("*bf16", "*fp32"):
    builds += [
        (rmsnorm._rmsnorm_fwd_kernel, dict(x_ptr=t, w_ptr=t, y_ptr=t, rstd_ptr="*fp32", stride_x="i32",
         stride_y="i32", rows="i32", H="i32", eps="fp32", BLOCK_R="constexpr", BLOCK_H="constexpr"),
         dict(BLOCK_R=2, BLOCK_H=2048)),
        (rmsnorm._rmsnorm_bwd_kernel, dict(x_ptr=t, w_ptr=t, dy_ptr=t, rstd_ptr="*fp32", dx_ptr=t,
         dw_ptr="*fp32", stride_x="i32", stride_dy="i32", stride_dx="i32", rows="i32", H="i32",
         rows_per_program="i32", BLOCK_R="constexpr", BLOCK_H="constexpr"),
         dict(BLOCK_R=2, BLOCK_H=2048)),
        (swiglu._swiglu_fwd_kernel, dict(gate_ptr=t, up_ptr=t, y_ptr=t, n="i64", BLOCK="constexpr"),
         dict(BLOCK=1024)),
        (swiglu._swiglu_bwd_kernel, dict(gate_ptr=t, up_ptr=t, dy_ptr=t, dgate_ptr=t, dup_ptr=t,
         n="i64", BLOCK="constexpr"), dict(BLOCK=1024)),
    ]
    for backward in (False, True):
        builds.append((rope._rope_kernel, dict(x_ptr=t, y_ptr="*fp32", cos_ptr=t, sin_ptr=t,
                       stride_b="i32", stride_h="i32", stride_t="i32", stride_cb="i32",
                       stride_ct="i32", rows="i32", H="i32", T="i32", HALF="i32",
                       BACKWARD="constexpr", BLOCK_R="constexpr", BLOCK_D="constexpr"),
                       dict(BACKWARD=backward, BLOCK_R=64, BLOCK_D=32)))
"""


def test_kernels_compile_for_gpu_without_one():
    compile_for_gpu_or_skip(_COMPILE_FOR_GPU)


# --- the model with the fused kernels --------------------------------------------------------------

def _pair(kernels=ALL_TRITON, device="cpu", **cfg_kw):
    plain = tiny_model(**cfg_kw).to(device)
    fused = Transformer(plain.config, kernels=kernels).to(device)
    fused.load_state_dict(plain.state_dict())
    fused.reset_buffers()
    return plain, fused.eval()


def _batch(vocab, B=2, T=13, prompt=8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, :prompt] = -100
    return ids.to(device), labels.to(device)


@pytest.mark.parametrize("shape", [{}, dict(hidden_size=72, intermediate_size=200, num_heads=3,
                                            num_kv_heads=1)], ids=["H64-hd16", "H72-hd24"])
def test_model_with_fused_kernels_matches_plain_fp32(shape):
    plain, fused = _pair(**shape)
    assert list(fused.state_dict()) == list(plain.state_dict())  # names and checkpoints unchanged
    ids, labels = _batch(plain.config.vocab_size)
    assert rel_err(fused(ids), plain(ids)) <= 1e-5
    losses = []
    for model in (plain, fused):
        loss_sum, n = model(ids, labels=labels)
        loss_sum.backward()
        losses.append(loss_sum)
    assert rel_err(losses[1], losses[0]) <= 1e-5
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 1e-5, name


@pytest.fixture
def one_thread():
    # tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # spinning threads make each step ~50x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(kernels, loss, steps=50, device="cpu", autocast=True):
    """A tiny model (hidden 48, 2 layers, 4/2 heads of 12, vocab 131) trained for `steps` AdamW
    steps on four batches in turn (4 x 24 tokens, the last 4 of each row labelled; it memorises
    them, so the loss falls), fp32 weights, with or without bf16 autocast. Returns the losses."""
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg, loss=loss, kernels=kernels)
    model.init_weights(seed=0)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = [_batch(cfg.vocab_size, B=4, T=24, prompt=20, device=device, seed=s) for s in range(4)]
    losses = []
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss_sum, n = model(ids, labels=labels)
        loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).float().cpu()


def _check_training_matches(device):
    # fp32: the same run, up to rounding order, after 50 steps
    plain = _train({}, "torch", device=device, autocast=False)
    fast = _train(ALL_TRITON, "triton", device=device, autocast=False)
    assert plain[-1] < 0.7 * plain[0]  # it learns: the comparison means something
    assert ((fast - plain).abs() / plain).max() <= 1e-5
    # bf16 autocast (fp32 master weights, as workload B): the paths round differently (the loss
    # keeps only labelled rows, the kernels round once where torch rounds per op) and the
    # differences compound through 50 AdamW steps. Measured on CPU under the interpreter (which
    # truncates fp32 -> bf16): max 1.9e-3, mean 5e-4 per step; for scale, bf16 itself moves the
    # plain curve by max 3.0e-3, mean 6.9e-4 (plain bf16 vs plain fp32). Bounds: the harness's
    # bf16 tolerance, 1e-2, at every step; 2e-3 on the mean.
    plain = _train({}, "torch", device=device)
    fast = _train(ALL_TRITON, "triton", device=device)
    dev = (fast - plain).abs() / plain
    assert dev.max() <= 1e-2 and dev.mean() <= 2e-3, (dev.max(), dev.mean())


@pytest.mark.slow
def test_training_with_all_fast_paths_matches_plain_torch(one_thread):
    # issue 8: 50 steps of the tiny model with the fused kernels + the Triton loss match the plain
    # torch path
    _check_training_matches("cpu")


def test_config_train_kernels(tmp_path):
    cfg = load_config(None, ['train.kernels={rmsnorm="triton", swiglu="torch"}'])
    assert cfg.train.kernels == {"rmsnorm": "triton", "swiglu": "torch"}
    assert 'kernels = {rmsnorm = "triton", swiglu = "torch"}' in to_toml(cfg)
    assert load_config(None, []).train.kernels == {}
    with pytest.raises(ConfigError, match=r"train.kernels: unknown kind 'rmsnrom'; kinds: rmsnorm"):
        load_config(None, ['train.kernels={rmsnrom="triton"}'])
    with pytest.raises(ConfigError, match=r"train.kernels.rope: unknown kernel 'fast'; registered: torch, triton"):
        load_config(None, ['train.kernels={rope="fast"}'])
    # a name a plugin registers is checked once the plugins are imported (build_model)
    assert load_config(None, ['train.plugins=["my_plugin"]', 'train.kernels={rope="mine"}'])
    with pytest.raises(ValueError, match="unknown layer kind"):
        Transformer(tiny_config(), kernels={"layernorm": "triton"})


def test_from_pretrained_and_build_model_pass_kernels(tmp_path):
    from ftcore.config import Config
    from ftcore.parallel import Process
    from ftcore.train import build_model
    from ftcore.weights import save_pretrained

    save_pretrained(tiny_model(), tmp_path)
    model = Transformer.from_pretrained(tmp_path, kernels={"rope": "triton"})
    assert model.layers[0].attn.rope_kernel is get_kernel("rope", "triton")
    assert model.layers[0].attn_norm.kernel is None  # the default: model.rms_norm runs
    cfg = Config()
    cfg.train.kernels = dict(ALL_TRITON)
    cfg.train.loss = "torch"
    model = build_model(cfg, tmp_path, Process())
    assert model.norm.kernel is get_kernel("rmsnorm", "triton")
    assert model.layers[1].mlp.swiglu_kernel is get_kernel("swiglu", "triton")
    cfg.train.kernels = {"swiglu": "nope"}
    with pytest.raises(ConfigError, match="train.kernels.swiglu: unknown kernel 'nope'"):
        build_model(cfg, tmp_path, Process())


# --- GPU (pytest -m gpu, FTCORE_TEST_CUDA=1): workload B's sizes ---------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gpu_rmsnorm_full_size(dtype):
    # 4 x 2048 tokens of hidden 2048; |ours - fp64| <= |plain torch - fp64| + tol
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    cases = list(rmsnorm_cases([(4, 2048, 2048)], dtypes=(dtype,), device="cuda"))
    check_kernel(get_kernel("rmsnorm", "triton"), reference_rms_norm, cases, versus=rms_norm, tol=tol)
    check_kernel(get_kernel("rmsnorm", "triton"), reference_rms_norm,
                 rmsnorm_cases([(37, 48), (67, 72), (1, 200), (3, 3000)], dtypes=(dtype,), device="cuda"))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gpu_swiglu_full_size(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    cases = list(swiglu_cases([(4, 2048, 8192)], dtypes=(dtype,), device="cuda"))
    check_kernel(get_kernel("swiglu", "triton"), reference_swiglu, cases, versus=swiglu, tol=tol)
    check_kernel(get_kernel("swiglu", "triton"), reference_swiglu,
                 swiglu_cases(SWIGLU_SHAPES, dtypes=(dtype,), device="cuda"))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,cos_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-autocast"])
def test_gpu_rope_full_size(dtype, cos_dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    fn = joined(get_kernel("rope", "triton"))
    cases = list(rope_cases([(4, 2048, 32, 8, 64)], dtypes=(dtype,), device="cuda", cos_dtype=cos_dtype))
    check_kernel(fn, joined(reference_rope), cases, versus=joined(apply_rope_qk), tol=tol)
    check_kernel(fn, joined(reference_rope), rope_cases(ROPE_SHAPES, dtypes=(dtype,), device="cuda",
                                                        layouts=("model", "2d")))


@gpu
@needs_cuda
def test_gpu_model_and_training_match_plain():
    plain, fused = _pair(device="cuda")
    ids, labels = _batch(plain.config.vocab_size, device="cuda")
    assert rel_err(fused(ids), plain(ids)) <= 1e-5
    _check_training_matches("cuda")
