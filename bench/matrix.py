"""The matrix of bench_step.py: the model shapes (presets), the rows (one strategy changed at a
time, the best combinations, the memory ladder, the transformers peers) and the `ftcore train`
config each ftcore row stands for, with its memory estimate."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

import common  # noqa: F401  (the checkout on sys.path)
from ftcore.config import Config
from ftcore.model import ModelConfig


PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(cfg=dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                  num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2.5-0.5b": dict(cfg=dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                  num_layers=24, num_heads=14, num_kv_heads=2, rope_theta=1000000.0,
                                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  qkv_bias=True)),
    # fp32 AdamW state alone is 128 GB: only --estimate-only (or strategies that fit) make sense
    "llama-3-8b": dict(cfg=dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                                max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
                       memory_only=True),
    # the CPU benchmark's shape (issue 19): big enough for bf16 to pay, small enough for 2 cores
    "cpu-50m": dict(cfg=dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1376,
                             num_layers=6, num_heads=8, num_kv_heads=8, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, tie_word_embeddings=False), micro_batch=4, seq_len=512),
    # SmolLM2-135M-Instruct, the real model of configs/smollm2_reviews_cpu.toml, at that recipe's shape
    "smollm2-135m": dict(cfg=dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
                         micro_batch=8, seq_len=256, prompt_frac=0.8),
    "tiny": dict(cfg=dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=True)),
}


def model_config(preset: str) -> ModelConfig:
    return ModelConfig(**PRESETS[preset]["cfg"])


@dataclass
class Row:
    name: str
    what: str
    impl: str = "ftcore"              # ftcore | hf
    precision: str = "bf16-autocast"  # fp32 master + bf16 autocast: the peers' usual set-up; ftcore: or auto
    ac: str = "none"                  # ftcore: none | full | selective; hf: none | full (gradient checkpointing)
    loss: str = "torch"               # ftcore: or auto
    compile: bool = False             # ftcore: each block; hf: the whole model
    fsdp: bool = False
    liger: bool = False
    kernels: str = ""                 # ftcore: "triton" = fused RMSNorm, RoPE and SwiGLU (train.kernels)
    # the memory strategies (train.*): bf16 AdamW states with stochastic rounding, the optimizer
    # stepped in backward, activations offloaded to pinned CPU memory, FSDP2 CPU offload
    states_bf16: bool = False
    optimizer_in_backward: bool = False
    activation_offload: bool = False
    cpu_offload: bool = False

    @property
    def slow(self) -> bool:
        return self.compile or self.loss == "compile"


_RUNGS = [  # (name, what it adds, the keys it sets)
    ("ladder-loss", "+ fused Triton loss (labelled rows only)", dict(loss="triton")),
    ("ladder-ac", "+ full activation checkpointing", dict(ac="full")),
    ("ladder-bf16", "+ pure bf16 weights and gradients, bf16 AdamW states, stochastic rounding",
     dict(precision="bf16", states_bf16=True)),
    ("ladder-oib", "+ optimizer step in backward (each gradient freed as it is used)", dict(optimizer_in_backward=True)),
    ("ladder-offload", "+ activations offloaded to pinned CPU memory", dict(activation_offload=True)),
    ("ladder-cpu", "+ FSDP2 CPU offload of parameters, gradients and optimizer states",
     dict(fsdp=True, cpu_offload=True)),
]


def _ladder() -> list["Row"]:
    rows, keys = [], {}
    for name, what, adds in _RUNGS:
        keys.update(adds)
        rows.append(Row(name, what, **keys))
    return rows


LADDER = _ladder()


LADDER_ROWS = ["baseline"] + [r.name for r in LADDER]


ROWS = [
    Row("baseline", "fp32 master + bf16 autocast, no AC, torch loss"),
    Row("bf16-mixed", "bf16 compute via FSDP's MixedPrecisionPolicy (world 1)", precision="bf16-mixed", fsdp=True),
    Row("bf16", "pure bf16 weights, grads, AdamW states", precision="bf16"),
    Row("ac-full", "activation checkpointing: every block", ac="full"),
    Row("ac-selective", "checkpointing that keeps matmul/attention outputs", ac="selective"),
    Row("loss-triton", "fused Triton loss, labelled rows only", loss="triton"),
    Row("loss-chunked", "fused loss in plain torch, labelled rows only", loss="chunked"),
    Row("fsdp", "FSDP2 world 1, fp32 params + autocast", fsdp=True),
    Row("kernels-triton", "fused Triton RMSNorm, RoPE, SwiGLU", kernels="triton"),
    Row("best", "bf16-mixed + triton loss", precision="bf16-mixed", fsdp=True, loss="triton"),
    Row("best-ac", "bf16-mixed + triton loss + full AC", precision="bf16-mixed", fsdp=True, loss="triton", ac="full"),
    Row("best-kernels", "bf16-mixed + triton loss + fused kernels", precision="bf16-mixed", fsdp=True,
        loss="triton", kernels="triton"),
    Row("default", "ftcore train's defaults here (train.loss and train.precision = auto)", precision="auto", loss="auto"),
    Row("fp32", "fp32 throughout, torch loss", precision="fp32"),
    Row("fp32-chunked", "fp32 throughout, labelled rows only", precision="fp32", loss="chunked"),
    Row("hf", "transformers' model of the shape, fp32 + autocast", impl="hf"),
    Row("hf-fp32", "transformers' model of the shape, fp32 (its default)", impl="hf", precision="fp32"),
    Row("hf-gc", "hf + gradient checkpointing", impl="hf", ac="full"),
    Row("hf-liger", "hf + Liger Kernel", impl="hf", liger=True),
    Row("hf-liger-gc", "hf + Liger + gradient checkpointing", impl="hf", liger=True, ac="full"),
    # the memory ladder: each row adds one strategy to the one before (`baseline` is its first rung)
    *LADDER,
    # compiled rows last: minutes of compilation the first time (cached under --out afterwards)
    Row("loss-compile", "torch.compile of the torch loss", loss="compile"),
    Row("compile", "torch.compile of each block", compile=True),
    Row("best-compile", "bf16-mixed + triton loss + compiled blocks", precision="bf16-mixed", fsdp=True,
        loss="triton", compile=True),
    Row("default-compile", "the defaults + torch.compile of each block", precision="auto", loss="auto", compile=True),
    Row("hf-compile", "hf under torch.compile", impl="hf", compile=True),
    Row("hf-compile-bf16", "hf under torch.compile, pure bf16", impl="hf", compile=True, precision="bf16"),
]


SMOKE_ROWS = ["baseline", "ac-selective", "loss-chunked", "bf16", "default", "hf"]


# --device cpu: ftcore's default against the peer at its default precision and at the same one
CPU_ROWS = ["hf-fp32", "hf", "fp32", "fp32-chunked", "loss-chunked", "default", "default-compile"]


def why_unavailable(row: Row, device: str) -> str | None:
    """A reason this row cannot run here, found without importing anything heavy."""
    if row.impl == "hf" and importlib.util.find_spec("transformers") is None:
        return "transformers not importable"
    if row.liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not importable"
    if row.loss == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton loss needs CUDA (or TRITON_INTERPRET=1)"
    if row.loss == "triton" and importlib.util.find_spec("triton") is None:
        return "triton not importable"
    if (row.activation_offload or row.cpu_offload) and device != "cuda":  # as ftcore.offload.check_offload
        return "activation / CPU offload needs CUDA"
    return None


def run_config(row: Row, cfg: ModelConfig, device, rows: int) -> Config:
    """The `ftcore train` config of a row, "auto" resolved for this device and shape as `ftcore
    train` resolves it: the benchmark builds, steps and optimizes the model with ftcore.step's own
    functions from it, so a row measures what a run with these keys runs."""
    from ftcore.hardware import MatmulShape, resolve_auto
    run_cfg = Config()
    t = run_cfg.train
    t.precision, t.activation_checkpointing, t.loss, t.compile = row.precision, row.ac, row.loss, row.compile
    t.fsdp = "on" if row.fsdp else "off"
    t.kernels = {k: row.kernels for k in ("rmsnorm", "rope", "swiglu")} if row.kernels else {}
    # the peers' optimizer exactly: a constant 1e-5 (a warmup would start ftcore's rows at lr / 11)
    t.lr, t.beta1, t.beta2, t.weight_decay, t.grad_clip, t.warmup_steps = 1e-5, 0.9, 0.95, 0.0, 1.0, 0
    if row.states_bf16:
        t.optimizer_state_dtype, t.stochastic_rounding = "bfloat16", True
    t.optimizer_in_backward, t.activation_offload, t.cpu_offload = row.optimizer_in_backward, row.activation_offload, row.cpu_offload
    if t.optimizer_in_backward:
        t.grad_clip = 0.0  # stepped during backward: no global norm to clip by (config.validate says so too)
    resolve_auto(t, torch.device(device), MatmulShape.of(cfg, rows))  # rows: tokens of a micro-batch
    return run_cfg


def estimate_row(row: Row, cfg: ModelConfig, B: int, T: int, labelled_fraction: float, device: str) -> dict | None:
    """ftcore.memory's prediction for an ftcore row (peers are other models: not estimated)."""
    if row.impl != "ftcore":
        return None
    from ftcore.estimate import estimate_run
    run_cfg = run_config(row, cfg, device, rows=B * T)
    run_cfg.train.micro_batch_size = run_cfg.train.global_batch_size = B
    run_cfg.data.max_seq_len = T
    e = estimate_run(run_cfg, cfg, device=torch.device(device), labelled_fraction=labelled_fraction)
    return {"est_peak": e["peak_bytes"], "est_phase": e["peak_phase"], "est_breakdown": e["breakdown"]}
