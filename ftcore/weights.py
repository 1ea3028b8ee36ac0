"""Hugging Face safetensors in and out: name mapping, sharded index, tied embeddings. A GGUF
file (ftcore.gguf) is read through the same two loaders.

load_pretrained builds the model on the meta device and materialises each parameter straight
from the file in its target dtype and device, so peak memory stays near one copy of the model.
Both loaders take their tensors from checkpoint_tensors: (name, read rows) pairs, whatever the
format.

load_into_shards is the FSDP path, where no rank may hold the whole model: the model was built on
the meta device and sharded (fully_shard); each rank allocates only its shards and reads from the
files only the rows it owns (dim-0 shards are contiguous byte ranges of a safetensors file; of a
GGUF file, whole quantized blocks), with plain positioned reads rather than a memory map, so nothing of the file is counted in the rank's
resident memory beyond one tensor's slice in flight.

save_pretrained writes tensor by tensor: with `fetch` (a function of a parameter name that every
rank calls in the same order, e.g. to gather a DTensor) it holds one tensor at a time, never the
whole model (the safetensors header is planned from the shapes first).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch

from ftcore.files import staging_path, write_atomic
from ftcore.gguf import is_gguf
from ftcore.hf import IGNORED_TENSORS, config_to_hf, hf_to_ours, ours_to_hf  # noqa: F401 (name mapping re-exported)
from ftcore.source import checkpoint_dtype, read_config
from ftcore.model import ModelConfig, Transformer

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class WeightsError(ValueError):
    """A checkpoint that does not match the model: names the tensor and the file."""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _target(file: Path, hf_name: str, shape, cfg: ModelConfig, expected: dict) -> str | None:
    """Our name of a file's tensor, checked against the model; None for a tensor to skip."""
    if IGNORED_TENSORS.match(hf_name):
        return None
    name = hf_to_ours(hf_name)
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None  # some tied checkpoints store the shared matrix twice
    if name is None or name not in expected:
        raise WeightsError(f"{file}: unexpected tensor {hf_name!r}")
    if tuple(shape) != tuple(expected[name].shape):
        raise WeightsError(f"{file}: tensor {hf_name!r} has shape {list(shape)}, expected {list(expected[name].shape)}")
    return name


def _check_complete(path: Path, expected: dict, loaded: set[str]) -> None:
    missing = sorted(set(expected) - loaded)
    if missing:
        raise WeightsError(f"{path}: missing tensor {ours_to_hf(missing[0])!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def load_pretrained(cls=Transformer, path=".", dtype=None, device=None, loss: str = "torch",
                    kernels: dict[str, str] | None = None) -> Transformer:
    """The model of an HF directory or a GGUF file, materialised tensor by tensor in `dtype`."""
    path = Path(path)
    cfg = read_config(path)
    dtype = dtype or checkpoint_dtype(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg, loss=loss, kernels=kernels)
    expected = {n: p for n, p in model.named_parameters()}  # tied lm_head appears once, as embed
    for name, read in checkpoint_tensors(path, cfg, expected):
        rows = expected[name].shape[0] if expected[name].ndim else 1
        _set_param(model, name, read(0, rows).to(device=device, dtype=dtype))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_buffers(device)
    return model


def checkpoint_tensors(path: Path, cfg: ModelConfig, expected: dict) -> Iterator[tuple[str, Callable[[int, int], torch.Tensor]]]:
    """(our name, read(first_row, rows)) for every tensor of a checkpoint (an HF directory's
    safetensors files, or a GGUF file), each checked against `expected` {name: parameter} before it
    is read; a missing tensor raises once the files are done. read() returns those rows of dim 0
    in the file's dtype (GGUF: dequantized to float32), reading nothing else, whenever it is called
    (`dict(checkpoint_tensors(...))` checks every tensor first and then reads in any order)."""
    path = Path(path)
    if is_gguf(path):
        from ftcore.gguf import tensor_entries
        yield from tensor_entries(path, {n: tuple(p.shape) for n, p in expected.items()})
        return
    loaded: set[str] = set()
    for file in _weight_files(path):
        if not file.is_file():
            raise WeightsError(f"{file}: listed in the index but missing")
        header, data_start = read_safetensors_header(file)
        for hf_name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            name = _target(file, hf_name, info["shape"], cfg, expected)
            if name is not None:
                yield name, _row_reader(file, hf_name, info, data_start)
                loaded.add(name)
    _check_complete(path, expected, loaded)


def _row_reader(file: Path, hf_name: str, info: dict, data_start: int) -> Callable[[int, int], torch.Tensor]:
    """Rows of one safetensors tensor by a positioned read (dim-0 rows are contiguous bytes); the
    file is opened for each read, so a reader can be called at any time, in any order."""
    file_dtype = SAFETENSORS_DTYPES[info["dtype"]]
    shape = info["shape"]
    row_bytes = math.prod(shape[1:]) * file_dtype.itemsize

    def read(first: int, rows: int) -> torch.Tensor:
        buf = torch.empty(rows * row_bytes, dtype=torch.uint8)
        with open(file, "rb") as fh:
            fh.seek(data_start + info["data_offsets"][0] + first * row_bytes)
            got = fh.readinto(buf.numpy()) if rows else 0
        if got != buf.numel():
            raise WeightsError(f"{file}: tensor {hf_name!r} cannot be read; truncated file?")
        return buf.view(file_dtype).view(rows, *shape[1:]) if shape else buf.view(file_dtype).view(())
    return read


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """({tensor name: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a
    safetensors file: an 8-byte little-endian header length, then the JSON header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which ftcore does not read")
        nbytes = math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if end - begin != nbytes or data_start + end > size:
            raise WeightsError(f"{file}: tensor {name!r} cannot be read (its bytes end past the file, "
                               f"or do not match its shape); truncated file?")
    return header, data_start


def _owned_rows(param) -> tuple[int, int]:
    """(first row, row count) of dim 0 that this rank holds of a parameter: FSDP2 shards dim 0
    as torch.chunk does (ceil(rows / world) each, the last ranks possibly short or empty)."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.ndim else 1
    placements = param.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise WeightsError(f"sharded loading reads dim-0 shards on a 1-D mesh; got {placements}")
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    rows = param.shape[0]
    chunk = math.ceil(rows / world)
    first = min(rank * chunk, rows)
    return first, max(0, min(rows - first, chunk))


def load_into_shards(model: Transformer, path, device, buffers_device=None) -> int:
    """Fill the shards of a model built on the meta device and sharded with fully_shard, from the
    checkpoint in `path` (safetensors or GGUF), converting to the parameters' dtype on the way.
    The shards live on `device`, the buffers (RoPE's inv_freq) on `buffers_device` (default: the
    same): with FSDP's CPU offload the shards stay on the CPU while the forward runs on the GPU,
    and FSDP moves only the parameters there. Returns the bytes this rank holds. Errors (a missing,
    unexpected, misshapen or unreadable tensor) are the same one line on every rank, found before
    any collective."""
    from torch.distributed.tensor import DTensor
    path, device = Path(path), torch.device(device)
    cfg = model.config
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    expected = dict(model.named_parameters())  # a tied lm_head appears once, as embed
    for name, read in checkpoint_tensors(path, cfg, expected):
        param = expected[name]
        local = param.to_local() if isinstance(param, DTensor) else param
        first, rows = _owned_rows(param)
        if rows:
            with torch.no_grad():
                local.copy_(read(first, rows).view(local.shape))
    model.reset_buffers(buffers_device or device)
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in expected.values())


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value, requires_grad=getattr(mod, attr).requires_grad))


def _readable(path: Path) -> None:
    """An export is readable like any file the user writes (safetensors' own writer made them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class _SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is
    known from the plan, so each tensor's bytes go to disk when it arrives and nothing is held.
    (safetensors' own save_file takes every tensor at once and copies each to bytes: the whole
    shard twice.) Written to FILE.tmp, renamed by close()."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype):
        self.path, self.tmp = path, staging_path(path)
        self.expected = [(name, shape) for name, shape in layout]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.dtype, self.i = dtype, 0

    def write(self, t: torch.Tensor) -> None:
        name, shape = self.expected[self.i]
        assert tuple(t.shape) == shape and t.dtype == self.dtype, (name, tuple(t.shape), shape, t.dtype)
        self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.i += 1

    def close(self) -> None:
        assert self.i == len(self.expected), f"{self.path}: {self.i} of {len(self.expected)} tensors written"
        self.f.close()
        _readable(self.tmp)
        os.replace(self.tmp, self.path)


def save_pretrained(model: Transformer, path, tokenizer=None, state_dict: dict | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    fetch: Callable[[str], torch.Tensor | None] | None = None, write: bool = True) -> None:
    """Write config.json, generation_config.json and safetensors (sharded with an index above
    max_shard_bytes) that transformers loads. `state_dict`: {our name: tensor} (default:
    model.state_dict()); its shapes and dtypes plan the shard files. `fetch(name)`: the full tensor
    of a name, called for every name in file order (every rank calls it, when it gathers); each is
    written as soon as it is fetched, so one tensor is held at a time. `write=False`: fetch, write nothing (the ranks
    that only take part in the gathers)."""
    cfg: ModelConfig = model.config
    path = Path(path)
    sd = state_dict if state_dict is not None else model.state_dict()
    fetch = fetch or sd.__getitem__
    hf_names = {n: ours_to_hf(n) for n in sd if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    out_dtype = dtype or sd[next(iter(hf_names))].dtype
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(hf_names, key=hf_names.get):
        nbytes = sd[name].numel() * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if write:
        path.mkdir(parents=True, exist_ok=True)
    for shard, fname in zip(shards, names):
        layout = [(hf_names[n], tuple(sd[n].shape)) for n in shard]
        writer = _SafetensorsWriter(path / fname, layout, out_dtype) if write else None
        for name in shard:
            t = fetch(name)
            if writer is not None:
                writer.write(t.detach().to(device="cpu", dtype=out_dtype).contiguous())
            del t
        if writer is not None:
            writer.close()
    if not write:
        return
    if len(shards) > 1:
        total = sum(sd[n].numel() for n in hf_names) * out_dtype.itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {hf_names[n]: f for shard, f in zip(shards, names) for n in shard}}
        write_atomic(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    elif (path / "model.safetensors.index.json").exists():
        (path / "model.safetensors.index.json").unlink()
    # weights of an earlier save into this directory are stale: transformers prefers a
    # model.safetensors over an index, so a leftover single file would shadow new shards
    for old in path.glob("model*.safetensors"):
        if old.name not in names and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old.name):
            old.unlink()

    hf = config_to_hf(cfg, out_dtype)
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    write_atomic(path / "config.json", json.dumps(hf, indent=2))
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    if tokenizer is not None and len(getattr(tokenizer, "eos_ids", [])) > 1:
        gen["eos_token_id"] = list(tokenizer.eos_ids)
    write_atomic(path / "generation_config.json", json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
