"""The shapes and dtypes the estimator's arithmetic is written in: the model's dimensions under
one-letter names (B batch, T sequence, H hidden, I intermediate, V vocabulary, L layers; nh, nkv
heads, hd head dim; n = B*T tokens of one micro-batch) and the bytes per element of each kind of
tensor under a precision mode."""
from __future__ import annotations

import math
from dataclasses import dataclass

MiB = 2 ** 20
GiB = 2 ** 30


def shard(count: int, world: int) -> int:
    """Elements of `count` one rank holds when FSDP shards it over `world` ranks (world 1: all)."""
    return math.ceil(count / world)


PRECISIONS = ("fp32", "bf16-autocast", "bf16-mixed", "bf16")
AC_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of each kind of tensor under a precision mode."""
    master: int     # parameters as the optimizer sees them, their gradients, each AdamW state
    compute: int    # matmul inputs and outputs, attention, SwiGLU
    residual: int   # the residual stream between blocks (and the embedding output)
    autocast: bool  # per-op casts: bf16 copies of weights and of each matmul's input
    unsharded: int  # FSDP's all-gathered parameters (the MixedPrecisionPolicy's param_dtype)


def precision_dtypes(precision: str) -> Dtypes:
    if precision == "fp32":
        return Dtypes(master=4, compute=4, residual=4, autocast=False, unsharded=4)
    if precision == "bf16-autocast":  # fp32 weights, bf16 matmuls; norms/residual stay fp32
        return Dtypes(master=4, compute=2, residual=4, autocast=True, unsharded=4)
    if precision == "bf16-mixed":     # fp32 shards, FSDP all-gathers bf16: the whole forward in bf16
        return Dtypes(master=4, compute=2, residual=2, autocast=False, unsharded=2)
    if precision == "bf16":           # everything bf16, AdamW states too
        return Dtypes(master=2, compute=2, residual=2, autocast=False, unsharded=2)
    raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Shape:
    """One micro-batch of a model: its dimensions and parameter counts (ModelConfig's, not recounted)."""
    B: int
    T: int
    H: int
    I: int
    V: int
    L: int
    nh: int
    nkv: int
    hd: int
    tied: bool
    block_params: int  # ModelConfig.block_params: weights, biases and the two norms of one block
    total_params: int  # ModelConfig.num_params
    attn_fp32: bool = False  # bf16 attention computed in fp32 (CPU, small heads: model.Attention)
    kv_expanded: bool = False  # K and V expanded to every query head for SDPA (model.expand_kv_for_sdpa)

    @classmethod
    def of(cls, cfg, micro_batch_size: int, seq_len: int) -> "Shape":
        return cls(micro_batch_size, seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                   cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings,
                   cfg.block_params(), cfg.num_params())

    @property
    def n(self) -> int:
        return self.B * self.T

    @property
    def qd(self) -> int:
        return self.nh * self.hd

    @property
    def kvd(self) -> int:
        return self.nkv * self.hd

    @property
    def block_linear_params(self) -> int:
        """Weights and biases of a block's seven linears (what autocast casts to bf16): all but the norms."""
        return self.block_params - 2 * self.H

    @property
    def root_params(self) -> int:
        """Embedding, final norm and (untied) lm_head: FSDP's root unit."""
        return self.V * self.H * (1 if self.tied else 2) + self.H
