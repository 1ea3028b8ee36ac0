"""Run configuration: typed dataclasses per TOML section, `section.key=value` overrides, validation.

A config file is a TOML document whose tables are the sections below. Unknown sections or keys and
values of the wrong type are refused with one line that names the key and lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import datetime
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


DEFAULT_CHAT_DATE = "2024-07-26"  # what Llama 3.1's template writes when it is not told a date


class ConfigError(ValueError):
    """A user mistake in a config file or an override: the message is the whole story."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0


@dataclass
class ModelSourceConfig:
    """[model]: where the base comes from (not its shape: that is ftcore.model.ModelConfig)."""
    path: str = ""                 # HF checkpoint directory; empty = the base comes from [pretrain]
    dtype: str = "float32"         # dtype evaluation loads models in: float32 | bfloat16 | float16 | auto (bf16 where
                                   # this device computes it faster, ftcore/hardware.py); training follows train.precision


@dataclass
class PretrainConfig:
    """A from-scratch base model for machines with no checkpoint: BPE tokenizer + a tiny Llama
    trained on raw text with loss on every token. Used when model.path is empty."""
    steps: int = 300
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    text_fields: list[str] = field(default_factory=lambda: ["summary", "text"])  # what it reads of a record, a line each


@dataclass
class SyntheticConfig:
    num_records: int = 3000
    seed: int = 0


@dataclass
class DataConfig:
    path: str = ""                 # empty = the embedded review generator ([data.synthetic])
    format: str = ""               # jsonl | json | csv; empty = from the file suffix
    templates: Union[list[str], dict[str, float]] = field(
        default_factory=lambda: ["rating", "sentiment", "summary", "review"])
    user_templates: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {prompt, completion, kind}
    rename: dict[str, str] = field(default_factory=dict)  # dataset column -> template field
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    max_seq_len: int = 512
    max_completion_tokens: int = 128
    overlong: str = "truncate"     # truncate | drop (a completion longer than the room left)
    missing_field: str = "skip"    # skip | error (a record lacks a field a template needs)
    batching: str = "pad"          # pad | bucket | pack
    chat_format: str = "chatml"    # chatml | llama3: ftcore's own template for `messages` data when the model has none
    prompt_format: str = "auto"    # auto (the chat template if there is one, else plain) | chat | plain
    chat_template: str = ""        # a .jinja file, or the template itself, used instead of the model's chat template
    chat_date: str = DEFAULT_CHAT_DATE  # the day a chat template's strftime_now() gives (Llama 3.x write it)
    train_on: str = "all_assistant"  # all_assistant | last_assistant: the turns of `messages` data that carry loss
    max_records: int = 0           # 0 = all; else the first N records of the file (before dedupe)
    clean: str = ""                # "" | html (markup in text fields -> plain text: <br />, tags, entities)
    dedupe: list[str] = field(default_factory=list)  # drop records equal to an earlier one on these fields
    balance: float = 0.0           # classification training labels: 0 = as sampled ... 1 = every class equally often
    paraphrases: bool = True       # train built-in tasks on several instruction wordings (held-out ones stay unseen)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    max_steps: int = 100
    resume: str = "auto"           # auto | never
    global_batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"       # cosine | linear | constant
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0         # 0 = off
    precision: str = "auto"        # auto (ftcore/hardware.py) | fp32 | bf16-autocast | bf16-mixed | bf16
    activation_checkpointing: str = "none"  # none | full | selective
    loss: str = "auto"             # auto (triton on CUDA, chunked elsewhere) | torch | triton | compile | chunked
    kernels: dict[str, str] = field(default_factory=dict)  # layer kernels, e.g. {rmsnorm = "triton"}; missing = torch
    compile: bool = False          # torch.compile each transformer block
    fsdp: str = "auto"             # auto (on when world > 1) | on | off
    reshard_after_forward: bool = True
    nonfinite: str = "stop"        # stop | skip
    max_skipped_steps: int = 3     # with nonfinite=skip: this many non-finite steps in a row end the run
    device: str = "auto"           # auto | cpu | cuda
    plugins: list[str] = field(default_factory=list)  # modules imported first (e.g. to register kernels)
    # memory strategies (ftcore/optim.py, ftcore/offload.py), each off by default
    activation_offload: bool = False     # saved activations wait in pinned CPU memory (CUDA)
    optimizer_in_backward: bool = False  # each parameter's step runs in backward, its gradient freed at once
    cpu_offload: bool = False            # FSDP2 CPUOffloadPolicy: params, grads, optimizer states on the CPU
    optimizer_state_dtype: str = "float32"  # float32 | bfloat16 (AdamW's exp_avg and exp_avg_sq)
    stochastic_rounding: bool = False    # bf16 weights/states written back stochastically rounded


@dataclass
class EvalConfig:
    base: bool = True
    final: bool = True
    every: int = 0                 # validation loss every N steps; 0 = off
    max_examples: int = 200        # per task
    max_heldout_examples: int = 0  # per held-out paraphrase; 0 = max_examples
    shots: int = 0                 # k in-context examples for the base model's k-shot baseline
    heldout: bool = True           # also evaluate on held-out instruction paraphrases
    max_new_tokens: int = 64
    batch_size: int = 16
    samples: int = 3               # example generations shown side by side in eval.md


@dataclass
class CheckpointConfig:
    every: int = 0                 # 0 = no periodic checkpoints
    keep: int = 2
    export_final: bool = True
    max_shard_mb: int = 5120       # safetensors files of final/ and `ftcore export` at most this big
    export_gguf: str = ""          # "" | f32 | f16 | bf16 | q8_0: final/model-TYPE.gguf too (llama.cpp, Ollama)


@dataclass
class LogConfig:
    every: int = 1                 # a record per this many steps: their mean loss, tokens/s, peak memory
    progress: bool = True          # the tqdm line
    tensorboard: bool = False      # RUN_DIR/tensorboard/ too (the extra: pip install -e ".[tensorboard]")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "train.resume": ("auto", "never"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "fp32", "bf16-autocast", "bf16-mixed", "bf16"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "train.fsdp": ("auto", "on", "off"),
    "train.nonfinite": ("stop", "skip"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.optimizer_state_dtype": ("float32", "bfloat16"),
    "data.format": ("", "jsonl", "json", "csv"),
    "data.overlong": ("truncate", "drop"),
    "data.missing_field": ("skip", "error"),
    "data.batching": ("pad", "bucket", "pack"),
    "data.chat_format": ("chatml", "llama3"),
    "data.prompt_format": ("auto", "chat", "plain"),
    "data.train_on": ("all_assistant", "last_assistant"),
    "data.clean": ("", "html"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "checkpoint.export_gguf": ("", "f32", "f16", "bf16", "q8_0"),
}


# ---------------------------------------------------------------------------------------------
# building dataclasses from TOML tables, with type checks

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown key '{path}'; valid keys in [{where or 'top level'}]: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' must be a table, got {value!r}")
            value = _build(tp, value, path)
        else:
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not _type_ok(value, tp):
                raise ConfigError(f"'{path}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
            if path in CHOICES and value not in CHOICES[path]:
                raise ConfigError(f"'{path}' must be one of {', '.join(map(repr, CHOICES[path]))}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # not a TOML value: a plain string (e.g. run.dir=runs/x)
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    table: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for item in overrides:
        keys, value = _parse_override(item)
        node = table
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a table")
        node[keys[-1]] = value
    cfg = _build(Config, table, "")
    validate(cfg)
    return cfg


# (key, test, what the value must be): every number checked when the config is loaded, so that a
# mistake ends the run before pretraining or evaluation, not after them
_RANGES = [
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("train.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.max_skipped_steps", lambda v: v >= 1, ">= 1"),
    ("data.max_seq_len", lambda v: v >= 2, ">= 2"),
    ("data.max_completion_tokens", lambda v: v >= 1, ">= 1"),
    ("data.max_records", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("data.synthetic.num_records", lambda v: v >= 1, ">= 1"),
    ("eval.every", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("eval.max_examples", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("eval.max_heldout_examples", lambda v: v >= 0, ">= 0 (0 = eval.max_examples)"),
    ("eval.shots", lambda v: v >= 0, ">= 0"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.samples", lambda v: v >= 0, ">= 0"),
    ("checkpoint.every", lambda v: v >= 0, ">= 0 (0 = no periodic checkpoints)"),
    ("checkpoint.keep", lambda v: v >= 0, ">= 0 (0 = keep all)"),
    ("checkpoint.max_shard_mb", lambda v: v >= 1, ">= 1"),
    ("log.every", lambda v: v >= 1, ">= 1"),
] + [(f"pretrain.{k}", lambda v: v > 0, "> 0") for k in
     ("steps", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
      "seq_len", "batch_size", "lr")]


def _value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    t, data = cfg.train, cfg.data
    for key, ok, what in _RANGES:
        v = _value(cfg, key)
        if not ok(v):
            raise ConfigError(f"'{key}' must be {what}, got {v!r}")
    p = cfg.pretrain
    if p.hidden_size % p.num_heads or p.num_heads % p.num_kv_heads:
        raise ConfigError(f"pretrain: hidden_size={p.hidden_size} must be a multiple of num_heads={p.num_heads}, "
                          f"and num_heads a multiple of num_kv_heads={p.num_kv_heads}")
    if t.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda, but torch sees no CUDA device (use train.device=cpu or auto)")
    if not t.plugins:  # names registered by plugins exist only once they are imported (build_model checks again)
        check_loss(t.loss)
    if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
        raise ConfigError("train.global_batch_size and train.micro_batch_size must be positive")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if len(data.split) != 3 or any(r < 0 for r in data.split) or sum(data.split) <= 0:
        raise ConfigError(f"data.split must be three non-negative ratios (train, validation, test), got {data.split}")
    if not 0.0 <= data.balance <= 1.0:
        raise ConfigError(f"data.balance must be between 0 (labels as sampled) and 1 (every class equally often), got {data.balance}")
    try:
        datetime.date.fromisoformat(data.chat_date)
    except ValueError:
        raise ConfigError(f"data.chat_date must be a date like \"2024-07-26\", got {data.chat_date!r}") from None
    if data.max_completion_tokens >= data.max_seq_len:
        raise ConfigError(f"data.max_completion_tokens={data.max_completion_tokens} must be < data.max_seq_len={data.max_seq_len}")
    if t.max_steps < 0:
        raise ConfigError("train.max_steps must be >= 0")
    if cfg.checkpoint.export_gguf and not (cfg.checkpoint.export_final or cfg.eval.final):
        raise ConfigError(f"checkpoint.export_gguf={cfg.checkpoint.export_gguf!r} converts final/: it needs "
                          "checkpoint.export_final=true (or eval.final=true)")
    if t.optimizer_in_backward and t.grad_clip > 0:
        raise ConfigError("train.optimizer_in_backward steps each parameter as soon as its gradient is ready, "
                          "so there is no global-norm clipping: set train.grad_clip=0")
    if t.optimizer_in_backward and t.nonfinite == "skip":
        raise ConfigError("train.optimizer_in_backward updates the weights during backward, so a non-finite "
                          "step cannot be skipped: set train.nonfinite=stop")
    if t.cpu_offload and t.fsdp == "off":
        raise ConfigError("train.cpu_offload is FSDP2's CPU offload: it needs train.fsdp=auto or on")
    # kernel names registered by train.plugins exist only once the plugins are imported (in
    # build_model, which checks again)
    check_kernels(t.kernels, plugins_loaded=not t.plugins)
    if t.stochastic_rounding and t.precision != "bf16" and t.optimizer_state_dtype != "bfloat16":
        raise ConfigError("train.stochastic_rounding rounds bf16 weights or optimizer states: it needs "
                          "train.precision=bf16 or train.optimizer_state_dtype=bfloat16")


def check_loss(name: str) -> None:
    """train.loss: "auto" or a registered loss kernel."""
    from ftcore.kernels import available_losses  # no triton import
    names = available_losses()
    if name != "auto" and name not in names:
        raise ConfigError(f"'train.loss' must be auto or a registered loss kernel ({', '.join(names)}), got {name!r}")


def check_kernels(kernels: dict[str, str], plugins_loaded: bool = True) -> None:
    """train.kernels: every kind a layer kind, every name registered for it (a name not yet
    registered passes while plugins are still to be imported)."""
    from ftcore.kernels import LAYER_KINDS, available_kernels  # no triton import
    for kind, name in kernels.items():
        if kind not in LAYER_KINDS:
            raise ConfigError(f"train.kernels: unknown kind {kind!r}; kinds: {', '.join(LAYER_KINDS)}")
        names = available_kernels(kind)
        if name not in names and plugins_loaded:
            raise ConfigError(f"train.kernels.{kind}: unknown kernel {name!r}; registered: {', '.join(names)}")


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"micro_batch_size × world size = {cfg.train.micro_batch_size} × {world_size}")
    return cfg.train.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------
# writing the resolved config back as TOML (tomllib reads only; this covers our value types)

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(cfg: Config) -> str:
    lines = []

    def emit(obj, prefix):
        scalars, tables = [], []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            (tables if dataclasses.is_dataclass(v) else scalars).append((f.name, v))
        lines.append(f"[{prefix}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars)
        lines.append("")
        for k, v in tables:
            emit(v, f"{prefix}.{k}")

    for f in dataclasses.fields(cfg):
        emit(getattr(cfg, f.name), f.name)
    return "\n".join(lines)
