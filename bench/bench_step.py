"""Training steps of a real-shaped model, one memory/speed strategy at a time, peers side by side.

Workload B: a randomly initialised model of a real shape (default Llama-3.2-1B), micro-batch 4 x
2048 random token ids, the first 75% of each row labelled -100 (labels aligned: labels[t] is the
target of position t), gradient clipping at 1.0, one micro-batch per step; a few warmup steps, then
timed steps. An ftcore row is the `ftcore train` config of its keys (run_config): the model goes
through ftcore.train.parallelize, the optimizer is ftcore.optim.build_optimizer's (torch's AdamW,
fused on CUDA, or ftcore's AdamW for bf16 weights), the step is ftcore.train.train_step; the
transformers rows use torch's AdamW as their users do.

The matrix (--rows picks by name; default: all): a baseline (fp32 master weights + bf16 autocast,
no activation checkpointing, the plain torch loss), one strategy changed at a time, the best
combinations, and transformers' LlamaForCausalLM of the same shape with its usual options (when
importable). Compiled rows are slow to start, so they run last; each row runs in its own process
(a clean peak, OOMs and compile caches isolated): a row that fails is reported, not fatal.

Per row: tokens/s, useful MFU (bench/README.md has the FLOP formula), forward / backward /
optimizer time (CUDA events), peak allocated and reserved memory, and ftcore.memory's estimate
beside the measured peak. The markdown table is printed last; results.json and plots go to --out.

    python bench/bench_step.py --budget-s 420                     # GPU: the eager rows fit in ~4 min
    python bench/bench_step.py --rows loss-compile,compile,best-compile,hf-compile
    python bench/bench_step.py --sweep --rows baseline,ac-full,best   # + peak vs seq len / batch
    python bench/bench_step.py --preset llama-3-8b --estimate-only     # memory only, no run
    python bench/bench_step.py --smoke --out /tmp/b                    # tiny shape on CPU, CI
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from ftcore.config import Config  # noqa: E402
from ftcore.hf import config_to_hf  # noqa: E402
from ftcore.model import IGNORE_INDEX, ModelConfig  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
GiB = 2 ** 30


# ------------------------------------------------------------------------------------------------
# shapes

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


# ------------------------------------------------------------------------------------------------
# the matrix

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
    if (row.activation_offload or row.cpu_offload) and device != "cuda":  # as ftcore.optim.validate_switches
        return "activation / CPU offload needs CUDA"
    return None


# ------------------------------------------------------------------------------------------------
# FLOPs and MFU

PEAK_BF16_TFLOPS = [  # dense bf16 tensor-core peak, by device-name substring (first match)
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("H800", 989.4), ("H20", 148.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    for key, tf in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tf
    return None


def step_flops(cfg: ModelConfig, B: int, T: int, n_labelled: int) -> dict[str, float]:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward), bench/README.md:
    6 * (block matmul weights) * tokens  +  6 * L * B * T^2 * nh * hd  (causal attention: QK^T and
    PV, half of the T x T square)  +  6 * V * H * (lm_head rows). "useful" counts lm_head rows for
    labelled tokens only (what the step needs); "all_logits" for every token (what a full-logits
    loss computes). Recompute under activation checkpointing is not counted (model FLOPs)."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    block_weights = H * qd + 2 * H * kvd + qd * H + 3 * H * I
    dense = 6.0 * L * block_weights * B * T
    attn = 6.0 * L * B * T * T * qd
    lm = 6.0 * cfg.vocab_size * H
    return {"useful": dense + attn + lm * n_labelled, "all_logits": dense + attn + lm * B * T,
            "blocks": dense, "attention": attn}


# ------------------------------------------------------------------------------------------------
# the child process: build one row, run it, print one JSON line

def make_batch(cfg: ModelConfig, B: int, T: int, prompt_frac: float, device):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    input_ids, labels = ids[:, :-1].clone(), ids[:, 1:].clone()  # aligned: labels[t] = token t+1
    labels[:, :int(prompt_frac * T)] = IGNORE_INDEX
    # the transformers convention: labels like input_ids, shifted inside the model; the last
    # position of each row has no target there (T-1 vs T labelled rows at most)
    hf_labels = input_ids.clone()
    hf_labels[:, 1:][labels[:, :-1] == IGNORE_INDEX] = IGNORE_INDEX
    hf_labels[:, 0] = IGNORE_INDEX
    return input_ids.to(device), labels.to(device), hf_labels.to(device)


@torch.no_grad()
def init_on_device(model: torch.nn.Module, std: float = 0.02, our_name=lambda name: name) -> None:
    """Random init where the weights live (fast on a GPU): normal(0, std) matrices, unit norms,
    zero biases; the same scheme as Transformer.init_weights, without the CPU round trip. Each
    tensor draws from a generator seeded by its ftcore name (`our_name` maps a peer's names), so
    ftcore and transformers rows of one shape start from the same weights."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            g = torch.Generator(device=p.device).manual_seed(zlib.crc32(our_name(name).encode()))
            p.normal_(0.0, std, generator=g)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()


def run_config(row: Row, cfg: ModelConfig, device, rows: int) -> Config:
    """The `ftcore train` config of a row, "auto" resolved for this device and shape as `ftcore
    train` resolves it: the benchmark builds, steps and optimizes the model with ftcore.train's own
    functions from it, so a row measures what a run with these keys runs."""
    from ftcore.hardware import MatmulShape, resolve_auto
    run_cfg = Config()
    t = run_cfg.train
    t.precision, t.activation_checkpointing, t.loss, t.compile = row.precision, row.ac, row.loss, row.compile
    t.fsdp = "on" if row.fsdp else "off"
    t.kernels = {k: row.kernels for k in ("rmsnorm", "rope", "swiglu")} if row.kernels else {}
    t.lr, t.beta1, t.beta2, t.weight_decay, t.grad_clip = 1e-5, 0.9, 0.95, 0.0, 1.0
    if row.states_bf16:
        t.optimizer_state_dtype, t.stochastic_rounding = "bfloat16", True
    t.optimizer_in_backward, t.activation_offload, t.cpu_offload = row.optimizer_in_backward, row.activation_offload, row.cpu_offload
    if t.optimizer_in_backward:
        t.grad_clip = 0.0  # stepped during backward: no global norm to clip by (config.validate says so too)
    resolve_auto(t, torch.device(device), MatmulShape.of(cfg, rows))  # rows: tokens of a micro-batch
    return run_cfg


def build_ftcore(row: Row, cfg: ModelConfig, device, run_cfg: Config):
    """As ftcore.train.build_model builds it, initialised in place instead of loaded (no checkpoint
    of the shape is on disk): whole then parallelized, or under FSDP on the meta device, sharded,
    then each shard materialised where it lives (the CPU with cpu_offload)."""
    from ftcore.model import Transformer
    from ftcore.parallel import init_distributed
    from ftcore.train import parallelize
    with torch.device("meta"):
        model = Transformer(cfg, loss=run_cfg.train.loss, kernels=run_cfg.train.kernels)
    if run_cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    proc = init_distributed(device.type, need_group=row.fsdp, cpu_collectives=row.cpu_offload)
    where = torch.device("cpu") if row.cpu_offload else device
    if row.fsdp:
        parallelize(model, run_cfg, proc)
    model = model.to_empty(device=where)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own new parameter: tie again
        model.lm_head.weight = model.embed.weight
    init_on_device(model)
    model.reset_buffers(device)
    return model if row.fsdp else parallelize(model, run_cfg, proc)


def build_hf(row: Row, cfg: ModelConfig, device):
    import transformers
    if row.liger:  # patches the modeling module's classes: before the model is built
        import liger_kernel.transformers as lk
        getattr(lk, f"apply_liger_kernel_to_{cfg.model_type}")()
    hf = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hcfg = transformers.AutoConfig.for_model(cfg.model_type, **hf)
    hcfg.use_cache = False
    hcfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if row.precision == "bf16" else torch.float32
    with torch.device(device):  # initialised where it will run
        model = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=dtype)
    model.to(device).train()
    from ftcore.hf import hf_to_ours
    with torch.no_grad():
        init_on_device(model, our_name=lambda name: hf_to_ours(name) or name)  # the ftcore rows' weights
    if row.ac == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if row.compile:
        model = torch.compile(model)
    return model


class StepTimer:
    """Forward / backward / optimizer time of each step: CUDA events (no sync inside the step),
    perf_counter on CPU (where ops are synchronous)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def split_ms(self) -> list[tuple[float, float, float]]:
        out = []
        for marks in self.steps:
            if self.cuda:
                out.append(tuple(a.elapsed_time(b) for a, b in zip(marks, marks[1:])))
            else:
                out.append(tuple(1e3 * (b - a) for a, b in zip(marks, marks[1:])))
        return out


def run_child(spec: dict) -> dict:
    from ftcore.memory import AllocationTrace, dump_memory_snapshot, optimizer_state_tensors, record_memory_history, tensor_bytes
    if spec["device"] == "cpu":  # every row, peers included: the allocator `ftcore train` runs with
        from ftcore.hardware import keep_freed_memory
        keep_freed_memory()
    row = Row(**spec["row"])
    cfg = ModelConfig(**spec["cfg"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    from ftcore.optim import build_optimizer
    from ftcore.train import autocast_context, train_step
    run_cfg = run_config(row, cfg, device, rows=spec["micro_batch"] * spec["seq_len"])
    model = build_hf(row, cfg, device) if row.impl == "hf" else build_ftcore(row, cfg, device, run_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if row.impl == "hf":  # the peer as its users run it: torch's AdamW, fused where it can be
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
    else:  # exactly what `ftcore train` builds for these keys (ftcore's AdamW for bf16 weights)
        opt, _ = build_optimizer(model, run_cfg, device)
    autocast = autocast_context(run_cfg, device)

    def fresh_batch(B, T):
        ids, labels, hf_labels = make_batch(cfg, B, T, spec["prompt_frac"], device)
        return ids, labels, hf_labels, int((labels != IGNORE_INDEX).sum())

    class ForwardDone(contextlib.AbstractContextManager):
        """Entered by train_step around each forward (its `offload` slot): marks the forward's end."""
        marks: list | None = None

        def __exit__(self, *exc):
            if self.marks is not None:
                self.marks.append(timer_now())
            return False

    forward_done = ForwardDone()
    timer_now = StepTimer(device).mark
    around_forward = forward_done
    if run_cfg.train.activation_offload:
        from ftcore.offload import ActivationOffload
        offload = ActivationOffload(device)

        @contextlib.contextmanager
        def around_forward():  # the offloading hooks, then the mark: the forward ends inside both
            with offload, forward_done:
                yield
        around_forward = around_forward()

    def step(batch, timer: StepTimer | None = None):
        """One optimizer step; marks: start, forward done, backward (and clipping) done, optimizer done."""
        ids, labels, hf_labels, n_lab = batch
        marks = [timer.mark()] if timer else None
        if row.impl == "hf":
            with autocast:
                loss = model(input_ids=ids, labels=hf_labels).loss  # mean over labelled tokens
            if timer:
                marks.append(timer.mark())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:  # ftcore.train's own step: the sum over the step's token count, clipping included
            forward_done.marks = marks
            loss_sum, _ = train_step(model, opt, [{"input_ids": ids, "labels": labels}], n_lab, autocast,
                                     run_cfg.train.grad_clip, offload=around_forward)
            forward_done.marks = None
            loss = loss_sum / n_lab
        if timer:
            marks.append(timer.mark())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timer:
            marks.append(timer.mark())
            timer.steps.append(marks)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def measure_memory(batch) -> dict:
        """Peak bytes of one steady step (optimizer states exist): the CUDA allocator's, or on a
        CPU the allocations the profiler sees plus what existed before the step."""
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            step(batch)
            sync()
            return {"peak_alloc": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}
        used = (batch[0], batch[2]) if row.impl == "hf" else (batch[0], batch[1])
        base = tensor_bytes([*model.parameters(), *model.buffers(), *optimizer_state_tensors(opt), *used])
        with AllocationTrace() as mem:
            step(batch)
        return {"peak_alloc": base + mem.peak, "peak_reserved": None}

    out: dict = {"name": row.name}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        out["device_memory"] = torch.cuda.get_device_properties(device).total_memory
    if spec.get("sweep"):
        # peak memory over shapes, smallest first, stopping at the first OOM
        out["sweep"] = []
        for B, T in spec["sweep"]:
            try:
                batch = fresh_batch(B, T)
                step(batch)  # optimizer states, recompiles for the shape
                out["sweep"].append({"micro_batch": B, "seq_len": T, "status": "ok", **measure_memory(batch)})
            except torch.OutOfMemoryError:
                out["sweep"].append({"micro_batch": B, "seq_len": T, "status": "OOM"})
                break
            finally:
                batch = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        return out

    B, T = spec["micro_batch"], spec["seq_len"]
    batch = fresh_batch(B, T)
    out["n_labelled"] = batch[3]
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        step(batch)
    sync()
    out["warmup_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step(batch, timer)
    sync()
    wall = time.perf_counter() - t0
    out["loss"] = float(loss)
    out["step_s"] = wall / spec["steps"]
    out["tokens_per_s"] = B * T * spec["steps"] / wall
    splits = timer.split_ms()
    for i, k in enumerate(("fwd_ms", "bwd_ms", "opt_ms")):
        out[k] = statistics.median(s[i] for s in splits)
    if device.type == "cuda":
        out["peak_alloc"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
        out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    else:
        out.update(measure_memory(batch))
    odir = Path(spec["out"])
    if spec.get("memory_snapshot"):
        if device.type == "cuda":  # one more step, recorded: open it at https://pytorch.org/memory_viz
            record_memory_history()
            step(batch)
            path = odir / f"snapshot_{row.name}.pickle"
            dump_memory_snapshot(path)
            out["memory_snapshot"] = str(path)
        else:
            out["memory_snapshot"] = "skipped: CUDA's allocator records the history"
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                step(batch)
            sync()
        path = odir / f"trace_{row.name}.json.gz"
        prof.export_chrome_trace(str(path))
        out["profile"] = str(path)
    return out


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = run_child(spec)
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:
        res = {"name": spec["row"]["name"], "status": "OOM", "error": str(e).splitlines()[0][:300]}
    except Exception as e:  # reported in the table, not fatal to the matrix
        traceback.print_exc()
        res = {"name": spec["row"]["name"], "status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
    print(RESULT_TAG + json.dumps(res), flush=True)
    try:
        from ftcore.parallel import shutdown
        shutdown()
    except Exception:
        pass
    return 0


# ------------------------------------------------------------------------------------------------
# the parent: launch rows, collect, estimate, report

def launch(spec: dict, timeout: float, env: dict) -> dict:
    name = spec["row"]["name"]
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    status = "OOM" if "out of memory" in p.stderr.lower() else "failed"
    return {"name": name, "status": status, "error": f"exit {p.returncode}: {err}"[:300]}


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


def gpu_info() -> tuple[str | None, int | None]:
    """The GPU's name and memory from nvidia-smi: the parent process never touches CUDA, so no
    context of its own sits on the GPU while the rows run (the rows report the same from torch)."""
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        name, mib = (x.strip() for x in line.split(","))
        return name, int(float(mib)) * 2 ** 20
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return None, None


def cpu_info() -> str:
    """The CPU's model name, cores, torch's threads and its native bf16 features."""
    from ftcore.hardware import cpu_bf16_features
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    bf16 = ", ".join(cpu_bf16_features()) or "no native bf16"
    return f"CPU ({name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {bf16})"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "liger_kernel"):
        if importlib.util.find_spec(mod) is not None:
            try:
                from importlib.metadata import version
                v[mod] = version(mod.replace("_", "-"))
            except Exception:
                v[mod] = "?"
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def _size(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2 ** 20:.1f} MiB"


def fmt_table(results: dict) -> str:
    rows = results["rows"]
    meta = results["meta"]
    unit, div = ("GiB", GiB) if max([r.get("peak_alloc") or 0 for r in rows] + [r.get("est_peak") or 0 for r in rows]
                               + [0]) >= GiB else ("MiB", 2 ** 20)
    base = next((r for r in rows if r["name"] == "baseline" and r.get("status") == "ok"), None)

    def num(x, f="{:.1f}"):
        return "—" if x is None else f.format(x)

    head = ["row", "what changes", "tokens/s", "× base", "MFU", "fwd ms", "bwd ms", "opt ms",
            f"peak alloc {unit}", f"reserved {unit}", f"estimate {unit}", "est. err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            est = num(r["est_peak"] / div, "{:.2f}") if r.get("est_peak") else "—"
            lines.append(f"| {r['name']} | {r['what']} | {r.get('status')}: {r.get('error', '')[:80]} | | | | | | | | {est} | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        err = (r["est_peak"] / r["peak_alloc"] - 1) * 100 if r.get("est_peak") and r.get("peak_alloc") else None
        lines.append("| " + " | ".join([
            r["name"], r["what"], f"{r['tokens_per_s']:,.0f}", num(ratio, "{:.2f}"),
            num(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"), num(r["fwd_ms"]), num(r["bwd_ms"]), num(r["opt_ms"]),
            num(r["peak_alloc"] / div, "{:.2f}"), num(r["peak_reserved"] and r["peak_reserved"] / div, "{:.2f}"),
            num(r.get("est_peak") and r["est_peak"] / div, "{:.2f}"), num(err, "{:+.1f}%"),
        ]) + " |")
    w = meta["workload"]
    header = [
        f"**{meta['preset']}** ({meta['params'] / 1e6:,.0f}M params), micro-batch {w['micro_batch']} x {w['seq_len']}, "
        f"{w['n_labelled']} labelled tokens ({100 * w['labelled_fraction']:.0f}%), {w['steps']} timed steps after "
        f"{w['warmup']} warmup; {meta['device']}; {meta['date']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"command: `{meta['command']}`",
        f"MFU: useful matmul FLOPs ({meta['flops_per_step']['useful'] / 1e12:.2f} TFLOP/step; lm_head for labelled "
        f"rows only) / step time / {num(meta['peak_tflops'])} TFLOP/s bf16 peak; estimate = ftcore.memory "
        "(peers: not modelled); est. err = estimate / peak alloc - 1",
    ]
    return "\n".join(header + [""] + lines)


def fmt_estimates(results: dict) -> str:
    lines = ["| row | what changes | estimate GiB | peak during | biggest parts |", "|---|---|---|---|---|"]
    cap = results["meta"].get("device_memory")
    for r in results["rows"]:
        if not r.get("est_peak"):
            continue
        parts = sorted(r["est_breakdown"].items(), key=lambda kv: -kv[1])[:3]
        fits = "" if not cap else (" (fits)" if r["est_peak"] < cap else " (exceeds the GPU)")
        lines.append(f"| {r['name']} | {r['what']} | {r['est_peak'] / GiB:.2f}{fits} | {r['est_phase']} | "
                     + ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="model shape (default: llama-3.2-1b on CUDA, cpu-50m on a CPU)")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all on CUDA; on a CPU "
                    + ",".join(CPU_ROWS) + ")")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the preset's, else 4")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's, else 2048")
    ap.add_argument("--prompt-frac", type=float, default=None, help="leading share of each row labelled -100 "
                    "(default: the preset's, else 0.75)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no row after this many seconds")
    ap.add_argument("--row-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: from the GPU name)")
    ap.add_argument("--sweep", action="store_true", help="also: peak memory vs sequence length and micro-batch")
    ap.add_argument("--sweep-rows", default="baseline,ac-full,best")
    ap.add_argument("--sweep-seq", default="512,1024,2048,4096,8192")
    ap.add_argument("--sweep-mb", default="1,2,4,8,16")
    ap.add_argument("--memory-snapshot", action="store_true", help="CUDA: snapshot_ROW.pickle for pytorch.org/memory_viz")
    ap.add_argument("--profile", action="store_true", help="trace_ROW.json.gz (chrome://tracing, perfetto)")
    ap.add_argument("--estimate-only", action="store_true", help="print the memory estimates, run nothing")
    ap.add_argument("--run", action="store_true", help="run a memory-only preset (llama-3-8b) anyway")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU, 2 steps, a few rows (CI)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)

    if args.smoke:
        args.preset, args.device, args.micro_batch, args.seq_len = "tiny", "cpu", 2, 64
        args.steps, args.warmup = 2, 1
        args.rows = args.rows or ",".join(SMOKE_ROWS)
        args.sweep_seq, args.sweep_mb, args.sweep_rows = "32,64", "1,2", "baseline"
    # torch.cuda.is_available() asks the driver without creating a context
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    args.preset = args.preset or ("llama-3.2-1b" if device == "cuda" else "cpu-50m")
    preset = PRESETS[args.preset]
    args.micro_batch = args.micro_batch or preset.get("micro_batch", 4)
    args.seq_len = args.seq_len or preset.get("seq_len", 2048)
    args.prompt_frac = preset.get("prompt_frac", 0.75) if args.prompt_frac is None else args.prompt_frac
    cfg = model_config(args.preset)
    by_name = {r.name: r for r in ROWS}
    names = ([n.strip() for n in args.rows.split(",") if n.strip()]
             or (CPU_ROWS if device == "cpu" else [r.name for r in ROWS]))
    sweep_names = [n.strip() for n in args.sweep_rows.split(",") if n.strip()] if args.sweep else []
    unknown = [n for n in names + sweep_names if n not in by_name]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {', '.join(by_name)}")
    selected = sorted((by_name[n] for n in names), key=lambda r: r.slow)  # compiled rows last
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    B, T = args.micro_batch, args.seq_len
    n_labelled = B * (T - int(args.prompt_frac * T))
    frac = n_labelled / (B * T)
    flops = step_flops(cfg, B, T, n_labelled)
    gpu_name, gpu_mem = gpu_info() if device == "cuda" else (None, None)
    dev_name = (gpu_name or "CUDA GPU") if device == "cuda" else cpu_info()
    ptf = args.peak_tflops or (peak_tflops(dev_name) if device == "cuda" else None)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": dev_name, "versions": versions(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "preset": args.preset, "model": dataclasses.asdict(cfg), "params": cfg.num_params(),
        "workload": {"micro_batch": B, "seq_len": T, "prompt_frac": args.prompt_frac, "n_labelled": n_labelled,
                     "labelled_fraction": frac, "steps": args.steps, "warmup": args.warmup},
        "flops_per_step": flops, "peak_tflops": ptf,
        "device_memory": gpu_mem,
    }
    results = {"meta": meta, "rows": []}

    if args.estimate_only or (PRESETS[args.preset].get("memory_only") and not args.run):
        for row in selected:
            rec = {"name": row.name, "what": row.what, "status": "estimate only"}
            rec.update(estimate_row(row, cfg, B, T, frac, device) or {})
            results["rows"].append(rec)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{args.preset}: estimates only ({meta['params'] / 1e9:.2f}B params, micro-batch {B} x {T})\n")
        print(fmt_estimates(results))
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # compiled rows reuse their kernels on a rerun
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str((out / "cache" / "inductor").resolve()))
    env.setdefault("TRITON_CACHE_DIR", str((out / "cache" / "triton").resolve()))
    # micro_batch x seq_len: the workload's shape (a sweep child resolves "auto" for it too)
    common = {"cfg": dataclasses.asdict(cfg), "device": device, "prompt_frac": args.prompt_frac, "out": str(out.resolve()),
              "micro_batch": B, "seq_len": T}

    t_start = time.perf_counter()
    for i, row in enumerate(selected):
        rec = {"name": row.name, "what": row.what, "row": dataclasses.asdict(row)}
        elapsed = time.perf_counter() - t_start
        reason = why_unavailable(row, device)
        if reason:
            rec.update(status="skipped", error=reason)
        elif elapsed > args.budget_s:
            rec.update(status="skipped", error=f"budget ({args.budget_s:.0f} s) spent")
        else:
            spec = {**common, "row": dataclasses.asdict(row), "steps": args.steps,
                    "warmup": args.warmup, "memory_snapshot": args.memory_snapshot, "profile": args.profile}
            timeout = min(args.row_timeout_s, max(30.0, args.budget_s - elapsed + 30.0))
            t0 = time.perf_counter()
            rec.update(launch(spec, timeout, env))
            rec["wall_s"] = time.perf_counter() - t0
        rec.update(estimate_row(row, cfg, B, T, frac, device) or {})
        if rec.get("device_name"):  # what torch itself saw
            meta["device"], meta["device_memory"] = rec["device_name"], rec["device_memory"]
            ptf = meta["peak_tflops"] = args.peak_tflops or peak_tflops(rec["device_name"])
        if rec.get("status") == "ok" and ptf:
            rec["mfu"] = flops["useful"] / rec["step_s"] / (ptf * 1e12)
        results["rows"].append(rec)
        msg = rec.get("status")
        if msg == "ok":
            msg = f"{rec['tokens_per_s']:,.0f} tok/s, peak {_size(rec['peak_alloc'])}"
            if rec.get("est_peak"):
                msg += f" (estimate {_size(rec['est_peak'])}, {100 * (rec['est_peak'] / rec['peak_alloc'] - 1):+.1f}%)"
        elif rec.get("error"):
            msg += f": {rec['error']}"
        print(f"[{i + 1}/{len(selected)}] {row.name}: {msg} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)

    if args.sweep:
        results["sweep"] = run_sweep(args, cfg, device, common, env, t_start, frac)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    try:
        from plot import plot_results  # bench/plot.py, next to this file
        notes = plot_results(results, out)
    except ImportError as e:
        notes = [f"plots skipped: {e} (pip install -e '.[bench]')"]
    for n in notes:
        print(n, file=sys.stderr)
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    if results.get("sweep"):
        print(fmt_sweep(results["sweep"]) + "\n")
    print(fmt_table(results))  # last: the table is the end of stdout
    return 0


def run_sweep(args, cfg: ModelConfig, device: str, common: dict, env: dict, t_start: float, frac: float) -> list[dict]:
    """Peak memory vs sequence length (at --micro-batch) and vs micro-batch (at --seq-len), for a
    few strategies: measured (one process per strategy, smallest shape first, stopping at the
    first OOM) beside the estimate at every point, including those that did not fit."""
    by_name = {r.name: r for r in ROWS}
    seqs = [int(x) for x in args.sweep_seq.split(",")]
    mbs = [int(x) for x in args.sweep_mb.split(",")]
    points = sorted({(args.micro_batch, t) for t in seqs} | {(b, args.seq_len) for b in mbs}, key=lambda p: p[0] * p[1])
    out = []
    for name in [n.strip() for n in args.sweep_rows.split(",") if n.strip()]:
        row = by_name[name]
        reason = why_unavailable(row, device)
        elapsed = time.perf_counter() - t_start
        if row.impl != "ftcore":
            reason = "the sweep compares with the estimate: ftcore rows only"
        elif not reason and elapsed > args.budget_s:
            reason = f"budget ({args.budget_s:.0f} s) spent"
        if reason:
            print(f"sweep {name}: skipped ({reason})", file=sys.stderr)
            continue
        spec = {**common, "row": dataclasses.asdict(row), "sweep": points}
        res = launch(spec, min(args.row_timeout_s, max(30.0, args.budget_s - elapsed + 30.0)), env)
        measured = {(p["micro_batch"], p["seq_len"]): p for p in res.get("sweep", [])}
        for B, T in points:
            e = estimate_row(row, cfg, B, T, frac, device)
            m = measured.get((B, T), {"status": res.get("status") if res.get("status") != "ok" else "not run"})
            out.append({"row": name, "micro_batch": B, "seq_len": T, "est_peak": e["est_peak"], **m})
        print(f"sweep {name}: {sum(1 for p in measured.values() if p['status'] == 'ok')}/{len(points)} points "
              f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return out


def fmt_sweep(sweep: list[dict]) -> str:
    lines = ["| row | micro-batch | seq len | peak alloc GiB | estimate GiB | est. err |", "|---|---|---|---|---|---|"]
    for p in sweep:
        got = p.get("peak_alloc")
        measured = f"{got / GiB:.3f}" if got else p.get("status", "—")
        err = f"{100 * (p['est_peak'] / got - 1):+.1f}%" if got else "—"
        lines.append(f"| {p['row']} | {p['micro_batch']} | {p['seq_len']} | {measured} | {p['est_peak'] / GiB:.3f} | {err} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
