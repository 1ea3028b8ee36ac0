"""The Llama-family model against transformers: logits, loss and gradients of checkpoints that
transformers wrote; config.json forms and refusals; sliding window; KV cache; packed documents."""
import json
import warnings
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import ftcore.model as fm
from ftcore.hf import config_from_hf, read_config
from ftcore.model import ModelConfig, ModelConfigError, Transformer, document_mask
from ftcore.weights import ours_to_hf

from helpers import gpu, hf_grads_by_our_name, make_hf_checkpoint, needs_cuda, needs_transformers, rel_err, tiny_model

TOL = 1e-5
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # small, so that tiny head_dim=16 frequencies fall in all three llama3 regimes
          "original_max_position_embeddings": 16}

# id -> (model_type, transformers config overrides, save kwargs)
CASES = {
    "llama": ("llama", {}, {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, {}),
    "llama3-rope": ("llama", {"rope_scaling": dict(LLAMA3), "rope_theta": 500000.0}, {}),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}}, {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, {}),
    "llama-head_dim": ("llama", {"head_dim": 24}, {}),
    "mistral": ("mistral", {}, {}),
    "qwen2": ("qwen2", {}, {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}, {}),
    "llama-sharded": ("llama", {}, {"max_shard_size": "20KB"}),
    "qwen2-tied-sharded": ("qwen2", {"tie_word_embeddings": True}, {"max_shard_size": "20KB"}),
}
SEQ_LENS = [1, 7, 33, 64]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, ftcore model loaded from the checkpoint transformers saved)."""
    needs_transformers()
    model_type, kw, save = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(d, model_type, seed=len(request.param), **kw, **save)
    if save:
        assert (d / "model.safetensors.index.json").is_file()
        assert len(list(d.glob("model-*.safetensors"))) > 1
    ours = Transformer.from_pretrained(d).eval()
    assert ours.config.tie_word_embeddings == bool(kw.get("tie_word_embeddings", False))
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed.weight
    return hf, ours


@pytest.mark.parametrize("T", SEQ_LENS)
def test_logits_match_transformers(pair, T):
    hf, ours = pair
    x = torch.randint(0, ours.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert got.shape == ref.shape == (2, T, ours.config.vocab_size)
    assert rel_err(got, ref) <= TOL


def test_loss_and_grads_match_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 33, ours.config.vocab_size
    x = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)   # aligned: labels[t] is the target of t
    labels[0, :10] = -100                                 # an unlabelled prompt
    labels[1, ::3] = -100
    for m in (hf, ours):
        m.zero_grad(set_to_none=True)

    ref_sum = F.cross_entropy(hf(x).logits.float().reshape(-1, V), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
    loss_sum, n = ours(x, labels=labels)
    assert int(n) == int((labels != -100).sum())
    assert rel_err(loss_sum / n, ref_sum / n) <= TOL
    ref_sum.backward()
    loss_sum.backward()

    ref_grads = hf_grads_by_our_name(hf)
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(ref_grads)   # every parameter compared, ties counted once
    for name, p in ours_params.items():
        assert p.grad is not None and ref_grads[name] is not None, name
        assert rel_err(p.grad, ref_grads[name]) <= TOL, (name, ours_to_hf(name))
    for m in (hf, ours):
        m.zero_grad(set_to_none=True)


def test_loss_with_no_labelled_token_is_zero():
    model = tiny_model()
    x = torch.randint(0, 131, (2, 5))
    loss_sum, n = model(x, labels=torch.full((2, 5), -100))
    assert int(n) == 0 and loss_sum.item() == 0.0
    loss_sum.backward()
    assert all(not torch.isnan(p.grad).any() for p in model.parameters() if p.grad is not None)


def test_num_params():
    for kw in ({}, {"tie_word_embeddings": True}, {"qkv_bias": True, "o_bias": True}):
        model = tiny_model(**kw)
        assert model.config.num_params() == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# config.json forms

SHAPE = {"vocab_size": 131, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}

# (transformers config kwargs, the classic config.json written by hand for the same model)
FORMS = {
    "llama3.2": ({"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3),
                  "tie_word_embeddings": True},
                 {"model_type": "llama", "rope_theta": 500000.0, "tie_word_embeddings": True,
                  "rope_scaling": dict(LLAMA3), "attention_bias": False, "mlp_bias": False}),
    "linear-type": ({"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 10000.0}},
                    {"model_type": "llama", "rope_theta": 10000.0,
                     "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "plain-llama2": ({"model_type": "llama", "rope_theta": 10000.0},
                     {"model_type": "llama", "rope_theta": 10000.0, "rope_scaling": None}),
    "qwen2.5": ({"model_type": "qwen2", "rope_theta": 1000000.0, "tie_word_embeddings": True,
                 "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21},
                {"model_type": "qwen2", "rope_theta": 1000000.0, "tie_word_embeddings": True,
                 "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
                 "rope_scaling": None}),
    "mistral-nowindow": ({"model_type": "mistral", "rope_theta": 1000000.0, "sliding_window": None},
                         {"model_type": "mistral", "rope_theta": 1000000.0, "sliding_window": None}),
}


def _no_extra(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    d.pop("extra")
    return d


@pytest.mark.parametrize("form", list(FORMS))
def test_classic_and_transformers5_configs_parse_the_same(form, tmp_path):
    hf_kw, classic = FORMS[form]
    hf_cfg = needs_transformers().AutoConfig.for_model(**{**SHAPE, **hf_kw})
    hf_cfg.save_pretrained(tmp_path / "t5")
    t5 = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert "rope_parameters" in t5 and "rope_theta" not in t5   # really the transformers-5 form
    (tmp_path / "classic").mkdir()
    (tmp_path / "classic" / "config.json").write_text(json.dumps({**SHAPE, **classic}))

    a = read_config(tmp_path / "t5")
    b = read_config(tmp_path / "classic")
    assert _no_extra(a) == _no_extra(b)
    assert a.sliding_window is None                   # none of these uses a window <= 256
    if "rope_scaling" in classic and classic["rope_scaling"]:
        assert a.rope_scaling["rope_type"] == classic["rope_scaling"].get("rope_type", "linear")
        assert torch.equal(fm.rope_inv_freq(a), fm.rope_inv_freq(b))


def _classic(**kw):
    return {**SHAPE, "model_type": "llama", "rope_theta": 10000.0, **kw}


@pytest.mark.parametrize("d,words", [
    (_classic(model_type="gpt2"), ["model_type", "gpt2"]),
    ({k: v for k, v in _classic().items() if k != "model_type"}, ["model_type", "None"]),
    (_classic(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
     ["rope", "yarn"]),
    ({**_classic(), "rope_theta": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                            "rope_theta": 10000.0}}, ["rope", "yarn"]),
    (_classic(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["rope", "dynamic"]),
    (_classic(model_type="qwen2", layer_types=["full_attention", "sliding_attention"],
              use_sliding_window=True, sliding_window=16, max_window_layers=1),
     ["layer_types", "sliding_attention"]),
    (_classic(hidden_act="gelu"), ["hidden_act", "gelu"]),
], ids=["gpt2", "no-model_type", "yarn-classic", "yarn-t5", "dynamic", "layer_types", "gelu"])
def test_config_refusals_name_the_field(d, words):
    with pytest.raises(ModelConfigError) as e:
        config_from_hf(d, where="x/config.json")
    msg = str(e.value)
    assert "\n" not in msg and "x/config.json" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_mistral_sliding_window_refused_only_when_in_use(tmp_path):
    needs_transformers()
    hf = make_hf_checkpoint(tmp_path, "mistral", sliding_window=8)
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.config.sliding_window == 8
    x = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        # <= 8 tokens: the window masks nothing, and the logits are the reference's
        assert rel_err(ours(x[:, :8]), hf(x[:, :8]).logits) <= TOL
        with pytest.raises(ModelConfigError, match="sliding_window=8") as e:
            ours(x)
        assert "\n" not in str(e.value)
        # and through the KV cache: 8 cached positions fine, the 9th refused
        cache = ours.new_kv_cache(2, 16)
        ours(x[:, :6], kv_cache=cache)
        ours(x[:, 6:8], kv_cache=cache)
        with pytest.raises(ModelConfigError, match="sliding_window"):
            ours(x[:, 8:9], kv_cache=cache)


def test_qwen2_classic_sliding_window_in_use_refused_at_forward():
    cfg = config_from_hf({**SHAPE, "model_type": "qwen2", "use_sliding_window": True,
                               "sliding_window": 16, "max_window_layers": 1})
    assert cfg.sliding_window == 16
    model = Transformer(cfg)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ModelConfigError, match="sliding_window=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# KV cache over a left-padded batch

def test_kv_cache_left_padded_batch_matches_full_forward():
    model = tiny_model(seed=3, std=0.2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 131, (n,), generator=g) for n in (5, 9, 1, 7)]
    conts = torch.randint(1, 131, (4, 5), generator=g)   # 5 more tokens per row, all real
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)

    with torch.no_grad():
        cache = model.new_kv_cache(B, L + conts.shape[1])
        out = [model(ids, position_ids=pos, kv_cache=cache, attention_mask=mask)]
        nxt = pos[:, -1:] + 1
        # one token, then two at once, then two single tokens: chunks of a cached decode
        for a, b in ((0, 1), (1, 3), (3, 4), (4, 5)):
            step_pos = nxt + torch.arange(b - a)
            out.append(model(conts[:, a:b], position_ids=step_pos, kv_cache=cache))
            nxt = step_pos[:, -1:] + 1
        cached = torch.cat(out, dim=1)                     # (B, L + 5, V)
        assert cache.length == L + conts.shape[1]
        for i, p in enumerate(prompts):
            row = torch.cat([p, conts[i]])[None]
            full = model(row)[0]
            real = cached[i, L - len(p):]
            assert rel_err(real, full) <= TOL, i


# ------------------------------------------------------------------------------------------------
# packed documents

def _packed_batch(lengths_per_row, vocab, seed=0):
    """Rows of packed examples: ids, position_ids (restarting per example), doc_ids, aligned
    labels (the first third of each example unlabelled, like a prompt), and each example as
    (row, start, ids, labels)."""
    g = torch.Generator().manual_seed(seed)
    rows, examples = [], []
    for r, lengths in enumerate(lengths_per_row):
        parts, start = [], 0
        for j, n in enumerate(lengths):
            x = torch.randint(0, vocab, (n,), generator=g)
            y = torch.randint(0, vocab, (n,), generator=g)
            y[: n // 3] = -100
            parts.append((x, torch.arange(n), torch.full((n,), j), y))
            examples.append((r, start, x, y))
            start += n
        rows.append([torch.cat(col) for col in zip(*parts)])
    ids, pos, doc, labels = (torch.stack(col) for col in zip(*rows))
    return ids, pos, doc, labels, examples


PACKING = [[5, 9, 6], [12, 8]]


def _check_packed(model, full=True):
    """Packed rows give each example the logits and loss it has alone (no attention leak); with
    full, also each example's loss inside the pack (others' labels masked) and the gradients."""
    ids, pos, doc, labels, examples = _packed_batch(PACKING, model.config.vocab_size)
    with torch.no_grad():
        packed_logits = model(ids, position_ids=pos, doc_ids=doc)
        packed_total, packed_n = model(ids, position_ids=pos, doc_ids=doc, labels=labels)
        alone_total = 0.0
        for row, start, x, y in examples:
            alone_logits = model(x[None])[0]
            assert rel_err(packed_logits[row, start:start + len(x)], alone_logits) <= TOL
            alone_total = alone_total + model(x[None], labels=y[None])[0]
        assert int(packed_n) == int((labels != -100).sum())
        assert rel_err(packed_total, alone_total) <= TOL
    if not full:
        return
    for row, start, x, y in examples:
        only = torch.full_like(labels, -100)     # one packed example's loss: others masked out
        only[row, start:start + len(x)] = y
        with torch.no_grad():
            packed_loss, packed_n = model(ids, position_ids=pos, doc_ids=doc, labels=only)
            alone_loss, alone_n = model(x[None], labels=y[None])
        assert int(packed_n) == int(alone_n) == int((y != -100).sum())
        assert rel_err(packed_loss, alone_loss) <= TOL
    # gradients of the whole packed batch = the sum over examples run alone
    model.zero_grad(set_to_none=True)
    loss, _ = model(ids, position_ids=pos, doc_ids=doc, labels=labels)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for row, start, x, y in examples:
        model(x[None], labels=y[None])[0].backward()
    for n, p in model.named_parameters():
        assert rel_err(packed_grads[n], p.grad) <= TOL, n
    model.zero_grad(set_to_none=True)


def test_packed_documents_equal_examples_alone():
    _check_packed(tiny_model(seed=5, std=0.2))


def test_document_mask_flex_equals_dense():
    g = torch.Generator().manual_seed(0)
    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 10 + [1] * 6])
    q = torch.randn(2, 4, 16, 8, generator=g)
    k, v = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    dense = document_mask(doc, use_flex=False)
    assert dense.kind == "dense"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "flex_attention called without torch.compile()"
        try:
            flex = document_mask(doc, use_flex=True)
            got = flex.attend(q, k, v)
        except Exception as e:  # pragma: no cover - depends on the torch build
            pytest.skip(f"flex_attention does not run eagerly on CPU in torch {torch.__version__}: {e}")
    assert flex.kind == "block"
    assert rel_err(got, dense.attend(q, k, v)) <= TOL


def test_packed_documents_through_flex_attention(monkeypatch):
    """The CUDA path (flex attention BlockMask) run eagerly on CPU inside the whole model: logits
    and losses only, as flex attention has no backward on CPU in torch 2.13 ("FlexAttention does
    not support backward on CPU"); the gradients of the dense path are checked above."""
    real = fm.document_mask
    monkeypatch.setattr(fm, "document_mask", lambda doc_ids, use_flex: real(doc_ids, use_flex=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_packed(tiny_model(seed=6, std=0.2), full=False)


@pytest.mark.parametrize("kw", [{}, dict(qkv_bias=True, o_bias=True), dict(mlp_bias=True), dict(tie_word_embeddings=True),
                                dict(num_kv_heads=2, head_dim=16)])
def test_num_params_is_the_models_parameter_count(kw):
    """The one parameter count (the estimator and the benchmarks use it) equals what the model holds."""
    cfg = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, **kw)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# grouped K/V heads and SDPA's kernels

@pytest.mark.parametrize("dtype,kind,q_len,expanded", [
    (torch.float32, "causal", 64, True),     # flash needs fp16/bf16: the math kernel would materialise T x T
    (torch.bfloat16, "causal", 64, False),   # flash takes grouped heads itself
    (torch.bfloat16, "dense", 64, True),     # a mask: the math kernel again
    (torch.float32, "dense", 1, False),      # decoding one token: scores (B, H, 1, T), no bigger than K
])
def test_cuda_sdpa_gets_grouped_heads_only_where_an_efficient_kernel_takes_them(monkeypatch, dtype, kind, q_len, expanded):
    """On CUDA, what the model hands SDPA (fake CUDA tensors; SDPA itself replaced by a recorder):
    K and V expanded to every query head wherever enable_gqa would leave only the math kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    seen = {}

    def sdpa(q, k, v, **kw):
        seen.update(k_heads=k.shape[1], v_heads=v.shape[1], enable_gqa=kw.get("enable_gqa", False))
        return torch.empty_like(q)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    with FakeTensorMode():
        q = torch.empty(2, 8, q_len, 16, dtype=dtype, device="cuda")
        k, v = (torch.empty(2, 2, 64, 16, dtype=dtype, device="cuda") for _ in range(2))
        mask = fm.AttnMask("causal") if kind == "causal" else \
            fm.AttnMask("dense", dense=torch.ones(2, 1, q_len, 64, dtype=torch.bool, device="cuda"))
        mask.attend(q, k, v)
    assert seen == (dict(k_heads=8, v_heads=8, enable_gqa=False) if expanded else
                    dict(k_heads=2, v_heads=2, enable_gqa=True))


def test_expanded_kv_heads_give_the_same_model(monkeypatch):
    """The expanded path is the same attention: logits and gradients of a GQA model with K/V
    expanded (forced here on the CPU) against float64, no further off than SDPA's own grouped path."""
    ids = torch.randint(0, 131, (2, 33), generator=torch.Generator().manual_seed(0))

    def run(dtype, expand):
        monkeypatch.setattr(fm, "expand_kv_for_sdpa", lambda *a: expand)
        model = tiny_model(seed=3).to(dtype)
        loss, _ = model(ids, labels=ids)
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    ref, grouped, expanded = run(torch.float64, False), run(torch.float32, False), run(torch.float32, True)
    eps = torch.finfo(torch.float32).eps
    for r, g, e in zip(ref, grouped, expanded):
        assert rel_err(e, r) <= rel_err(g, r) + 8 * eps, (rel_err(e, r), rel_err(g, r))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gqa_attention_never_needs_the_math_kernel(dtype):
    """With SDPA's math kernel (which materialises B x H x T x T per layer) taken away, a GQA model
    still trains: fp32 through expanded K/V and the memory-efficient kernel, bf16 through flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny_model(seed=3).to("cuda", dtype).train()
    ids = torch.randint(0, 131, (2, 256), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        loss, _ = model(ids, labels=ids)
        loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
