"""A minimal Llama-family decoder: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5.

token embedding -> N x [RMSNorm -> GQA attention (RoPE, SDPA) -> residual,
                        RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head

With labels, forward computes the loss itself (by the configured loss kernel) and returns
(loss_sum, n_target_tokens): the lm_head weight is only whole inside forward when FSDP shards it,
and the training loop normalises by the global token count of the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftcore.kernels import LAYER_KINDS, get_kernel, get_loss  # no triton import: Triton kernels load when first got
from ftcore.kernels.reference import apply_rope, apply_rope_qk, rms_norm, rotate_half, swiglu  # noqa: F401

IGNORE_INDEX = -100
# A CPU's flash attention runs bf16 slower than fp32 at small head dims (forward + backward at
# 16 x 4 heads x 256 x 32: 15.0 vs 8.8 ms), faster from 64 (4 x 8 x 512 x 64: 22.7 vs 30.4 ms;
# bench/notes.md): below this, bf16 attention on a CPU is computed in fp32.
CPU_BF16_ATTENTION_MIN_HEAD_DIM = 64


class ModelConfigError(ValueError):
    """A config.json this model cannot reproduce faithfully."""


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0                      # 0 = hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # None (plain) or {"rope_type": "llama3"|"linear", ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False                 # Qwen2, or Llama with attention_bias
    o_bias: bool = False                   # Llama with attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None      # refused at forward time if a sequence is longer
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # HF fields kept for the round trip, unused here

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                                   f"num_key_value_heads={self.num_kv_heads}")

    def block_matmul_params(self) -> int:
        """The weights of one block's matmuls: q, k, v, o, gate, up, down."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    def block_params(self) -> int:
        """Every parameter of one block: the matmul weights, their biases, the two norms."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        biases = (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0) + \
            ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        return self.block_matmul_params() + biases + 2 * h

    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.block_params() + self.hidden_size + emb * (1 if self.tie_word_embeddings else 2)

    def step_flops(self, B: int, T: int, n_labelled: int) -> dict[str, float]:
        """Matmul FLOPs of one training step of B x T tokens (forward + backward = 3 x forward):
        6 * block matmul weights * tokens  +  6 * L * B * T^2 * nh * hd (causal attention: QK^T and
        PV, half of the T x T square)  +  6 * V * H * lm_head rows. "useful" counts lm_head rows for
        the n_labelled tokens only (what the step needs), "all_logits" for every token (what a
        full-logits loss computes). Recompute under activation checkpointing is not counted (model
        FLOPs). bench/README.md derives it."""
        dense = 6.0 * self.num_layers * self.block_matmul_params() * B * T
        attn = 6.0 * self.num_layers * B * T * T * self.num_heads * self.head_dim
        lm = 6.0 * self.vocab_size * self.hidden_size
        return {"useful": dense + attn + lm * n_labelled, "all_logits": dense + attn + lm * B * T,
                "blocks": dense, "attention": attn}


# ------------------------------------------------------------------------------------------------
# rotary embeddings

def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


# ------------------------------------------------------------------------------------------------
# layer functions: rotate_half / apply_rope_qk, rms_norm and swiglu are what runs, defined beside
# the fused kernels that replace them (kernels/reference.py, the registry's "torch" kernels);
# `Transformer(kernels=...)` swaps in others by name (e.g. the fused Triton ones)

def layer_kernel(kind: str, name: str = "torch"):
    """None for the default ("torch": the function above runs), else the registered kernel."""
    if name == "torch":
        return None
    return get_kernel(kind, name)


# ------------------------------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel: str = "torch"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = layer_kernel("rmsnorm", kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class KVCache:
    """Per-layer keys/values for decoding, preallocated to max_len, plus which slots hold a real
    token (left padding of a batch of prompts leaves invalid slots)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        self.k[layer][:, :, self.length:self.length + t] = k
        self.v[layer][:, :, self.length:self.length + t] = v
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: str = "torch"):
        super().__init__()
        self.rope_kernel = layer_kernel("rope", rope)
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.wq = nn.Linear(h, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(h, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(h, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, h, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask: "AttnMask", kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = (self.rope_kernel or apply_rope_qk)(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = mask.attend(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, swiglu: str = "torch"):
        super().__init__()
        self.swiglu_kernel = layer_kernel("swiglu", swiglu)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.w_gate = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.w_up = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.w_down((self.swiglu_kernel or swiglu)(self.w_gate(x), self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: dict[str, str] | None = None):
        super().__init__()
        k = kernels or {}
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, k.get("rmsnorm", "torch"))
        self.attn = Attention(cfg, layer_idx, k.get("rope", "torch"))
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, k.get("rmsnorm", "torch"))
        self.mlp = MLP(cfg, k.get("swiglu", "torch"))

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


# ------------------------------------------------------------------------------------------------
# attention masks: plain causal, packed documents, decoding with a cache

class AttnMask:
    """How queries may attend, decided once per forward and shared by every layer.

    causal: SDPA's is_causal (flash/efficient kernels). dense: a boolean (B, 1, Tq, Tk) mask, for
    packed documents on CPU and for decoding. block: a flex-attention BlockMask for packed
    documents on CUDA, which never materialises a T x T mask."""

    def __init__(self, kind: str, dense: torch.Tensor | None = None, block=None):
        self.kind, self.dense, self.block = kind, dense, block

    def attend(self, q, k, v):
        if q.device.type == "cpu" and v.dtype == torch.bfloat16 and q.shape[-1] < CPU_BF16_ATTENTION_MIN_HEAD_DIM:
            with torch.autocast("cpu", enabled=False):
                return self._attend(q.float(), k.float(), v.float()).to(v.dtype)
        return self._attend(q, k, v)

    def _attend(self, q, k, v):
        if self.kind == "block":
            return _flex_attention()(q, k, v, block_mask=self.block, enable_gqa=True)
        gqa = k.shape[1] != q.shape[1]
        if gqa and expand_kv_for_sdpa(q.device.type, q.dtype, self.kind == "dense", q.shape[2]):
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            gqa = False
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)


def expand_kv_for_sdpa(device_type: str, dtype: torch.dtype, masked: bool, q_len: int) -> bool:
    """Whether grouped K/V heads are expanded to every query head before SDPA, instead of passed as
    they are with enable_gqa. On CUDA only flash and cuDNN attention take enable_gqa, and only in
    fp16/bf16 without a mask: anything else (fp32 training, a masked prefill) falls to the math
    kernel, which materialises (B, H, Tq, Tk) scores in every layer. Expanded heads, as
    transformers passes them, keep the memory-efficient kernel. Not for a single query row
    (decoding: its scores are no bigger than K), nor on a CPU, whose flash kernel takes grouped
    heads in every dtype, masked or not."""
    return device_type == "cuda" and q_len > 1 and (masked or dtype not in (torch.float16, torch.bfloat16))


_FLEX = None


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        # compiled, flex attention runs as a fused kernel; eager it is a slow reference
        _FLEX = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX


def document_mask(doc_ids: torch.Tensor, use_flex: bool) -> AttnMask:
    """Causal attention within each packed example (doc_ids: (B, T), one id per example)."""
    B, T = doc_ids.shape
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        return AttnMask("block", block=create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device))
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return AttnMask("dense", dense=(same & causal)[:, None])


def cache_mask(cache: KVCache, attention_mask: torch.Tensor | None, t: int) -> AttnMask:
    """New queries at positions [length, length + t) see every valid cached key up to themselves."""
    start, end = cache.length, cache.length + t
    B = cache.valid.shape[0]
    new_valid = (torch.ones(B, t, dtype=torch.bool, device=cache.valid.device)
                 if attention_mask is None else attention_mask.to(torch.bool))
    cache.valid[:, start:end] = new_valid
    q_pos = torch.arange(start, end, device=cache.valid.device)[:, None]
    k_pos = torch.arange(end, device=cache.valid.device)[None, :]
    allowed = cache.valid[:, None, :end] & (k_pos <= q_pos)[None]
    # a padded query (its own key invalid, nothing before it) would see no key at all: softmax of
    # nothing is NaN, so let every query see itself; padded outputs are never used
    allowed = allowed | (k_pos == q_pos)[None]
    return AttnMask("dense", dense=allowed[:, None])


# ------------------------------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, loss: str = "torch", kernels: dict[str, str] | None = None):
        super().__init__()
        self.config = cfg
        self.loss = loss  # a name in ftcore.kernels' registry
        # per layer kind ("rmsnorm", "rope", "swiglu"), a name in the registry; missing = "torch"
        self.kernels = dict(kernels or {})
        if self.kernels:
            if unknown := sorted(set(self.kernels) - set(LAYER_KINDS)):
                raise ValueError(f"kernels: unknown layer kind(s) {unknown}; kinds: {', '.join(LAYER_KINDS)}")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, self.kernels) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.kernels.get("rmsnorm", "torch"))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, loss: str = "torch",
                        kernels: dict[str, str] | None = None) -> "Transformer":
        from ftcore.weights import load_pretrained  # the one lazy import in ftcore: weights builds this class
        return load_pretrained(cls, path, dtype=dtype, device=device, loss=loss, kernels=kernels)

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for from-scratch models (the HF Llama scheme: normal(0, std), zero biases)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                w = torch.empty(m.weight.shape).normal_(0.0, std, generator=g)
                with torch.no_grad():
                    m.weight.copy_(w)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        self.reset_buffers()

    def reset_buffers(self, device=None):
        """Recompute non-persistent buffers (after building on the meta device)."""
        device = device or self.embed.weight.device
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        w = self.embed.weight
        return KVCache(self.config, batch_size, max_len, dtype or w.dtype, device or w.device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False):
        """Logits (B, T, V), or with labels (loss_sum, n_target_tokens); last_only: logits of the
        last position only, (B, 1, V) (a prefill that decodes on: the lm_head of every prompt
        position would cost as much as a tenth of the model, and (B, T, V) floats of memory)."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        sw = self.config.sliding_window
        if sw is not None and start + T > sw:
            raise ModelConfigError(f"sequence of {start + T} tokens exceeds sliding_window={sw}, and "
                                   "sliding-window attention is not implemented")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)

        if kv_cache is not None:
            mask = cache_mask(kv_cache, attention_mask, T)
        elif doc_ids is not None:
            mask = document_mask(doc_ids, use_flex=input_ids.is_cuda)
        else:
            mask = AttnMask("causal")

        x = self.embed(input_ids)
        # cos/sin in fp32, then in the residual dtype, once for all layers (as the HF reference)
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        h = self.norm(x[:, -1:] if last_only and labels is None else x)

        if labels is None:
            return self.lm_head(h)
        return self.loss_sum(h, labels)

    def loss_sum(self, h: torch.Tensor, labels: torch.Tensor):
        w = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            # autocast does not reach into custom kernels: hand them the autocast dtype ourselves
            dt = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dt), w.to(dt)
        flat = labels.reshape(-1)
        loss = get_loss(self.loss)(h.reshape(-1, h.shape[-1]), w, flat,
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (flat != IGNORE_INDEX).sum()
