"""One row of bench_step.py in a process of its own (a clean peak; an OOM, a crash or a compile
cache isolated): the parent sends a ChildSpec as JSON on the command line, the child builds the
row's model as `ftcore train` would, runs warmup and timed steps with ftcore.step's own
forward_backward and optimizer_step (the peers as their users run them), and prints one JSON
line tagged RESULT_TAG."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import ROOT, StepTimer
from ftcore.config import Config
from ftcore.hf import config_to_hf
from ftcore.model import IGNORE_INDEX, ModelConfig
from matrix import Row, run_config

RESULT_TAG = "BENCH_RESULT "


@dataclass
class ChildSpec:
    """What the parent tells a child: the row, the shape, the workload, and what to record."""
    row: Row
    cfg: ModelConfig
    device: str
    prompt_frac: float
    out: str                           # where snapshots and traces go
    micro_batch: int                   # the workload's shape ("auto" is resolved for it)
    seq_len: int
    steps: int = 0
    warmup: int = 0
    memory_snapshot: bool = False
    profile: bool = False
    sweep: list = field(default_factory=list)  # [(micro_batch, seq_len)]: peak memory only, at each

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ChildSpec":
        d = json.loads(text)
        return cls(**{**d, "row": Row(**d["row"]), "cfg": ModelConfig(**d["cfg"])})


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


class ForwardDone(contextlib.AbstractContextManager):
    """Entered by forward_backward around each forward (its around_forward): marks the forward's end."""

    def __init__(self, clock):
        self.clock, self.marks = clock, None

    def __exit__(self, *exc):
        if self.marks is not None:
            self.marks.append(self.clock())
        return False


class RowStep:
    """One row's model, optimizer and step, built as `ftcore train` builds them (the peers as their
    users run them)."""

    def __init__(self, spec: ChildSpec):
        from ftcore.optim import build_optimizer
        from ftcore.step import NonFiniteSkips, autocast_context
        self.spec, self.row, self.cfg = spec, spec.row, spec.cfg
        self.device = device = torch.device(spec.device)
        if device.type == "cpu":  # every row, peers included: the allocator `ftcore train` runs with
            from ftcore.hardware import keep_freed_memory
            keep_freed_memory()
        torch.manual_seed(0)
        self.run_cfg = run_config(self.row, self.cfg, device, rows=spec.micro_batch * spec.seq_len)
        if self.row.impl == "hf":  # torch's fused AdamW, as ftcore's rows use (CPU and CUDA)
            self.model = build_hf(self.row, self.cfg, device)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        else:  # exactly what `ftcore train` builds for these keys (ftcore's AdamW for bf16 weights)
            self.model = build_ftcore(self.row, self.cfg, device, self.run_cfg)
            self.opt, _ = build_optimizer(self.model, self.run_cfg, device)
        self.autocast = autocast_context(self.run_cfg, device)
        self.skips = NonFiniteSkips(self.run_cfg, None)
        self.forward_done = ForwardDone(StepTimer(device).mark)
        self.around_forward = self.forward_done
        if self.run_cfg.train.activation_offload:
            from ftcore.offload import ActivationOffload
            self.around_forward = _Both(ActivationOffload(device, head=self.model.norm), self.forward_done)

    def batch(self, B: int, T: int):
        ids, labels, hf_labels = make_batch(self.cfg, B, T, self.spec.prompt_frac, self.device)
        return ids, labels, hf_labels, int((labels != IGNORE_INDEX).sum())

    def step(self, batch, timer: StepTimer | None = None):
        """One optimizer step; marks: start, forward done, backward done, update (clipping, the
        non-finite rule, step, zero) done."""
        from ftcore.step import forward_backward, optimizer_step
        ids, labels, hf_labels, num_targets = batch
        marks = [timer.mark()] if timer else None
        if self.row.impl == "hf":
            with self.autocast:
                loss = self.model(input_ids=ids, labels=hf_labels).loss  # mean over labelled tokens
            if timer:
                marks.append(timer.mark())
            loss.backward()
            if timer:
                marks.append(timer.mark())
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:  # ftcore.step's forward_backward + optimizer_step, as the loop runs them
            self.forward_done.marks = marks
            loss_sum = forward_backward(self.model, [{"input_ids": ids, "labels": labels}], num_targets,
                                        self.autocast, around_forward=self.around_forward)
            self.forward_done.marks = None
            if timer:
                marks.append(timer.mark())
            loss, _ = optimizer_step(self.model, self.opt, loss_sum, num_targets, self.run_cfg.train.grad_clip,
                                     self.skips)
        if timer:
            marks.append(timer.mark())
            timer.steps.append(marks)
        return loss

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_memory(self, batch) -> dict:
        """Peak bytes of one steady step (optimizer states exist): the CUDA allocator's, or on a
        CPU the allocations the profiler sees plus what existed before the step."""
        from ftcore.memory import AllocationTrace, optimizer_state_tensors, tensor_bytes
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            self.step(batch)
            self.sync()
            return {"peak_alloc": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}
        used = (batch[0], batch[2]) if self.row.impl == "hf" else (batch[0], batch[1])
        base = tensor_bytes([*self.model.parameters(), *self.model.buffers(), *optimizer_state_tensors(self.opt), *used])
        with AllocationTrace() as mem:
            self.step(batch)
        return {"peak_alloc": base + mem.peak, "peak_reserved": None}


class _Both(contextlib.AbstractContextManager):
    """The offloading hooks, then the mark: the forward ends inside both (entered once per forward)."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    def __enter__(self):
        self.outer.__enter__()
        self.inner.__enter__()

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)
        return self.outer.__exit__(*exc)


def sweep(r: RowStep, points: list) -> list[dict]:
    """Peak memory over shapes, smallest first, stopping at the first OOM."""
    out = []
    for B, T in points:
        try:
            batch = r.batch(B, T)
            r.step(batch)  # optimizer states, recompiles for the shape
            out.append({"micro_batch": B, "seq_len": T, "status": "ok", **r.peak_memory(batch)})
        except torch.OutOfMemoryError:
            out.append({"micro_batch": B, "seq_len": T, "status": "OOM"})
            break
        finally:
            batch = None
            if r.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def timed(r: RowStep, spec: ChildSpec) -> dict:
    """Warmup, then the timed steps: step time, tokens/s, the forward / backward / update split, peak memory."""
    B, T = spec.micro_batch, spec.seq_len
    batch = r.batch(B, T)
    out = {"n_labelled": batch[3]}
    t0 = time.perf_counter()
    for _ in range(spec.warmup):
        r.step(batch)
    r.sync()
    out["warmup_s"] = time.perf_counter() - t0
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(r.device)
    r.sync()
    t0 = time.perf_counter()
    for _ in range(spec.steps):
        loss = r.step(batch, timer)
    r.sync()
    wall = time.perf_counter() - t0
    out.update(loss=float(loss), step_s=wall / spec.steps, tokens_per_s=B * T * spec.steps / wall)
    splits = timer.split_ms()
    for i, k in enumerate(("fwd_ms", "bwd_ms", "opt_ms")):
        out[k] = statistics.median(s[i] for s in splits)
    if r.device.type == "cuda":
        out.update(peak_alloc=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                   alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0))
    else:
        out.update(r.peak_memory(batch))
    out.update(recordings(r, spec, batch))
    return out


def recordings(r: RowStep, spec: ChildSpec, batch) -> dict:
    """What --memory-snapshot and --profile ask for: one more step recorded each."""
    from ftcore.memory import dump_memory_snapshot, record_memory_history
    out = {}
    odir, name = Path(spec.out), spec.row.name
    if spec.memory_snapshot:
        if r.device.type == "cuda":  # open it at https://pytorch.org/memory_viz
            record_memory_history()
            r.step(batch)
            dump_memory_snapshot(odir / f"snapshot_{name}.pickle")
            out["memory_snapshot"] = str(odir / f"snapshot_{name}.pickle")
        else:
            out["memory_snapshot"] = "skipped: CUDA's allocator records the history"
    if spec.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                r.step(batch)
            r.sync()
        prof.export_chrome_trace(str(odir / f"trace_{name}.json.gz"))
        out["profile"] = str(odir / f"trace_{name}.json.gz")
    return out


def run_child(spec: ChildSpec) -> dict:
    r = RowStep(spec)
    out: dict = {"name": spec.row.name}
    if r.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        out["device_memory"] = torch.cuda.get_device_properties(r.device).total_memory
    if spec.sweep:
        out["sweep"] = sweep(r, spec.sweep)
    else:
        out.update(timed(r, spec))
    return out


def child_main(spec_json: str) -> int:
    spec = ChildSpec.from_json(spec_json)
    try:
        res = run_child(spec)
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:
        res = {"name": spec.row.name, "status": "OOM", "error": str(e).splitlines()[0][:300]}
    except Exception as e:  # reported in the table, not fatal to the matrix
        traceback.print_exc()
        res = {"name": spec.row.name, "status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
    print(RESULT_TAG + json.dumps(res), flush=True)
    try:
        from ftcore.parallel import shutdown
        shutdown()
    except Exception:
        pass
    return 0


def launch(spec: ChildSpec, timeout: float, env: dict) -> dict:
    """The parent's side: run one row as `python bench/child.py SPEC_JSON`, its result or why none came."""
    name = spec.row.name
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), spec.to_json()],
                           capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    status = "OOM" if "out of memory" in p.stderr.lower() else "failed"
    return {"name": name, "status": status, "error": f"exit {p.returncode}: {err}"[:300]}



if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
