"""Under FSDP no rank holds the whole model: built on the meta device, each rank reads only its
shards from the safetensors files, and the final export goes out tensor by tensor. A synthetic
checkpoint of >= 300M parameters, 1 process against 2 (gloo), peak resident memory measured."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftcore.model import ModelConfig, Transformer
from ftcore.tokenizer import Tokenizer
from ftcore.weights import save_pretrained
from helpers import make_run_setup, needs_transformers, rel_err, run_cli, run_overrides, run_ranks

MiB = 2 ** 20
SHARD_MB = 300  # the synthetic checkpoint and the exports come in several files, with an index


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _growth_mib(stdout: str, what: str) -> dict[int, float]:
    """{rank: MiB} from the lines `ftcore train` prints per rank: the peak resident memory's growth
    while loading, the peak host memory allocated while exporting."""
    pat = rf"rank (\d+): {what}.*?(?:grew|allocated) ([\d,.]+) MiB"
    return {int(r): float(g.replace(",", "")) for r, g in re.findall(pat, stdout)}


@pytest.fixture(scope="module")
def big_setup(tmp_path_factory):
    """reviews.jsonl and a tokenizer from make_run_setup, and base/: a random 315M-parameter Llama
    (fp32, 1.26 GB in 5 safetensors files with an index)."""
    root = make_run_setup(tmp_path_factory.mktemp("big"))
    tok = Tokenizer.from_dir(root / "base")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=1024, intermediate_size=2816, num_layers=27,
                      num_heads=16, num_kv_heads=8, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert cfg.num_params() >= 300e6
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_pretrained(model, root / "base", tokenizer=tok, max_shard_bytes=SHARD_MB * MiB)
    assert len(list((root / "base").glob("model-*.safetensors"))) >= 4
    return root, cfg.num_params() * 4


def _args(setup, run_dir, **train):
    return ["train", "configs/tiny_cpu.toml", *run_overrides(
        setup, run_dir, data=dict(max_seq_len=64, max_completion_tokens=16, templates='["rating"]'),
        train=dict(max_steps=2, global_batch_size=2, micro_batch_size=1, lr=1e-4, **train),
        checkpoint=dict(export_final="true", max_shard_mb=SHARD_MB))]


@pytest.mark.slow
def test_two_ranks_load_their_halves_and_train_and_export_like_one(big_setup, tmp_path):
    setup, ckpt_bytes = big_setup
    one = run_cli(_args(setup, tmp_path / "one", fsdp="off"), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(_args(setup, tmp_path / "two", fsdp="on"), nproc=2, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    # loading: each rank's peak resident memory grew by its half plus one tensor and a margin,
    # never by the checkpoint
    load = _growth_mib(two.stdout, "loaded its shards")
    assert sorted(load) == [0, 1], two.stdout[-3000:]
    for rank, grew in load.items():
        assert grew * MiB <= 0.6 * ckpt_bytes, (rank, grew, ckpt_bytes / MiB)

    # the same losses: the sharded model computes what the whole one does
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2):
        assert abs(a - b) / abs(a) <= 1e-5, (l1, l2)

    # export: rank 0 allocated at most its half + the largest file + a margin (gathering the whole
    # model would be the checkpoint's size); the same tensors as the 1-process export, and
    # transformers loads it with the same logits as ftcore
    export = _growth_mib(two.stdout, "exported")
    largest_file = max(f.stat().st_size for f in (tmp_path / "two" / "final").glob("*.safetensors"))
    print(f"checkpoint {ckpt_bytes / MiB:.0f} MiB; loading growth per rank {load} MiB; export growth {export} MiB; "
          f"largest file {largest_file / MiB:.0f} MiB")  # pytest -s shows the measurement
    assert export[0] * MiB <= ckpt_bytes / 2 + largest_file + 64 * MiB, (export, largest_file / MiB)
    files = sorted(p.name for p in (tmp_path / "two" / "final").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "one" / "final").glob("*.safetensors")) and len(files) >= 4
    for name in files:
        a, b = load_file(tmp_path / "one" / "final" / name), load_file(tmp_path / "two" / "final" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert rel_err(b[k], a[k]) <= 1e-5, (name, k)

    transformers = needs_transformers()
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = Transformer.from_pretrained(tmp_path / "one" / "final").eval()
    with torch.no_grad():
        want = ours(ids)
    del ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert rel_err(got, want) <= 1e-5


@pytest.mark.slow
def test_two_rank_run_resumes(tmp_path):
    """A 2-process run whose ranks load their shards resumes from its checkpoint to the same losses."""
    (tmp_path / "setup").mkdir()
    setup = make_run_setup(tmp_path / "setup")
    args = ["train", "configs/tiny_cpu.toml", *run_overrides(setup, tmp_path / "run", train=dict(max_steps=4, fsdp="on"),
                                                             checkpoint=dict(every=2))]
    first = run_cli(args, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    want = _losses(tmp_path / "run")
    again = run_cli(args, nproc=2)  # the newest checkpoint is step 2: steps 3 and 4 run again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert _losses(tmp_path / "run") == pytest.approx(want, rel=1e-6, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_a_bad_tensor_is_one_line_on_every_rank(tmp_path, damage):
    (tmp_path / "setup").mkdir()
    setup = make_run_setup(tmp_path / "setup")
    weights = setup / "base" / "model.safetensors"
    tensors = load_file(weights)
    bad = "model.layers.1.mlp.down_proj.weight"
    if damage == "missing":
        del tensors[bad]
    else:
        tensors[bad] = tensors[bad][:, :-1].contiguous()
    save_file(tensors, weights)
    # every rank must say it, and none may be left waiting in a collective (the timeout)
    said = "missing tensor" if damage == "missing" else "has shape"
    for code, _, err in run_ranks(["train", "configs/tiny_cpu.toml",
                                   *run_overrides(setup, tmp_path / "run", train=dict(fsdp="on"))]):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith("ftcore train: error:") and bad in lines[0] and said in lines[0], lines


# every model family and layout the loader knows, on 2 ranks with uneven shards (vocab 131 and
# MLP 128 rows split in two; 131 is odd), from single and indexed multi-file checkpoints, fp32 and bf16 files
FAMILIES = {
    "llama": {}, "llama-tied": {"tie_word_embeddings": True},
    "llama-biases": {"qkv_bias": True, "o_bias": True, "mlp_bias": True}, "llama-head_dim": {"head_dim": 24},
    "mistral": {"model_type": "mistral"}, "qwen2": {"model_type": "qwen2", "qkv_bias": True},
    "qwen2-tied": {"model_type": "qwen2", "qkv_bias": True, "tie_word_embeddings": True},
}


def _shard_and_compare(rank: int, root: str, port: int) -> None:
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from ftcore.hf import read_config
    from ftcore.parallel import apply_fsdp, init_distributed, shutdown
    from ftcore.weights import load_into_shards
    proc = init_distributed("cpu", need_group=True)
    results = {}
    for case_dir in sorted(Path(root).iterdir()):
        with torch.device("meta"):
            model = Transformer(read_config(case_dir))
        apply_fsdp(model, proc, "fp32")
        load_into_shards(model, case_dir, "cpu")
        ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = model(ids)  # FSDP gathers each unit's shards
            want = Transformer.from_pretrained(case_dir, dtype=torch.float32)(ids)
        results[case_dir.name] = rel_err(got, want)
    if rank == 0:
        (Path(root).parent / "results.json").write_text(json.dumps(results))
    shutdown()


@pytest.mark.slow
def test_every_family_loads_into_uneven_shards(tmp_path):
    import random

    import torch.multiprocessing as mp
    from helpers import tiny_model
    root = tmp_path / "ckpts"
    for i, (name, kw) in enumerate(FAMILIES.items()):
        model = tiny_model(seed=i, **kw)
        save_pretrained(model, root / f"{name}-single")
        save_pretrained(model, root / f"{name}-indexed", max_shard_bytes=20_000)
        save_pretrained(model, root / f"{name}-bf16", dtype=torch.bfloat16)
    mp.spawn(_shard_and_compare, args=(str(root), random.randint(20000, 40000)), nprocs=2)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 3 * len(FAMILIES)
    bad = {k: v for k, v in results.items() if v > 1e-6}
    assert not bad, bad
