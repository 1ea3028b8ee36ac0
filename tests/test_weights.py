"""HF safetensors in and out: round trips through transformers, sharding, tied embeddings, bad
checkpoints, and the peak memory of loading."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftcore.model import ModelConfigError, Transformer
from ftcore.weights import WeightsError, load_pretrained, ours_to_hf, save_pretrained

from helpers import needs_transformers, rel_err, tiny_model

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# id -> ftcore ModelConfig overrides
ROUND_TRIPS = {
    "llama": {},
    "llama3.2-tied": {"rope_scaling": dict(LLAMA3), "rope_theta": 500000.0, "tie_word_embeddings": True},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500.0},
    "llama-biases": {"qkv_bias": True, "o_bias": True, "mlp_bias": True},
    "llama-head_dim": {"head_dim": 24},
    "mistral": {"model_type": "mistral"},
    "qwen2": {"model_type": "qwen2", "qkv_bias": True},
    "qwen2-tied": {"model_type": "qwen2", "qkv_bias": True, "tie_word_embeddings": True},
}


def hf_load(path):
    model, info = needs_transformers().AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(k), (k, info[k])
    assert next(model.parameters()).dtype == torch.float32
    return model.eval()


def assert_same_logits(ours, hf, seed=0):
    x = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) <= TOL


def assert_bit_identical(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pa) == set(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and torch.equal(pa[name], pb[name]), name
    if a.config.tie_word_embeddings:
        assert b.lm_head.weight is b.embed.weight


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_through_transformers(case, sharded, tmp_path):
    model = tiny_model(seed=list(ROUND_TRIPS).index(case), **ROUND_TRIPS[case])
    save_pretrained(model, tmp_path, **({"max_shard_bytes": 20_000} if sharded else {}))
    index = tmp_path / "model.safetensors.index.json"
    if sharded:
        assert index.is_file() and not (tmp_path / "model.safetensors").exists()
        weight_map = json.loads(index.read_text())["weight_map"]
        n_tensors = len(dict(model.named_parameters()))
        assert len(weight_map) == n_tensors and len(set(weight_map.values())) > 1
        assert all((tmp_path / f).is_file() for f in weight_map.values())
    else:
        assert (tmp_path / "model.safetensors").is_file() and not index.exists()
    assert not list(tmp_path.glob("*.tmp"))

    again = Transformer.from_pretrained(tmp_path)
    assert again.config == model.config
    assert_bit_identical(model, again)

    hf = hf_load(tmp_path)
    assert_same_logits(model, hf)
    assert hf.config.tie_word_embeddings == model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_round_trip_bf16(tmp_path):
    model = tiny_model(seed=2, tie_word_embeddings=True)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = Transformer.from_pretrained(tmp_path)             # the dtype of config.json
    assert again.embed.weight.dtype == torch.bfloat16 and again.lm_head.weight is again.embed.weight
    for name, p in model.named_parameters():
        assert torch.equal(dict(again.named_parameters())[name], p.to(torch.bfloat16)), name
    as32 = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    assert as32.embed.weight.dtype == torch.float32
    assert torch.equal(as32.embed.weight, model.embed.weight.to(torch.bfloat16).float())


def test_ftcore_loads_its_own_save_of_a_transformers_checkpoint(tmp_path):
    """transformers -> ftcore -> save -> transformers: the same logits all the way."""
    from helpers import make_hf_checkpoint

    needs_transformers()
    hf = make_hf_checkpoint(tmp_path / "a", "qwen2", tie_word_embeddings=True)
    ours = Transformer.from_pretrained(tmp_path / "a")
    save_pretrained(ours, tmp_path / "b")
    assert_same_logits(ours, hf)
    assert_same_logits(ours, hf_load(tmp_path / "b"))


def test_resave_switching_single_and_sharded(tmp_path):
    """Saving over an existing export leaves no stale weights that transformers would pick up."""
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    save_pretrained(a, tmp_path)
    save_pretrained(b, tmp_path, max_shard_bytes=20_000)      # single -> sharded
    assert_same_logits(b, hf_load(tmp_path))
    assert_bit_identical(b, Transformer.from_pretrained(tmp_path))
    save_pretrained(a, tmp_path)                              # sharded -> single
    assert_same_logits(a, hf_load(tmp_path))
    assert_bit_identical(a, Transformer.from_pretrained(tmp_path))
    assert not list(tmp_path.glob("model-*.safetensors"))


def test_name_mapping_round_trips():
    from ftcore.weights import hf_to_ours

    model = tiny_model(qkv_bias=True, o_bias=True, mlp_bias=True)
    for name, _ in model.named_parameters():
        assert hf_to_ours(ours_to_hf(name)) == name
    assert hf_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError):
        ours_to_hf("no.such.param")


# ------------------------------------------------------------------------------------------------
# bad checkpoints: one line naming the tensor / file / field

@pytest.fixture
def ckpt(tmp_path):
    """A tiny ftcore checkpoint directory (single file) to break."""
    save_pretrained(tiny_model(seed=0), tmp_path / "ck")
    return tmp_path / "ck"


def _rewrite(file: Path, edit):
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _error(exc_type, path, *words):
    with pytest.raises(exc_type) as e:
        load_pretrained(path=path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg


def test_missing_tensor(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _error(WeightsError, ckpt, "model.layers.1.mlp.up_proj.weight", ckpt)


def test_several_missing_tensors(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if "layers.1." in k])
    _error(WeightsError, ckpt, "missing tensor", "more")


def test_wrong_shape(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    _rewrite(ckpt / "model.safetensors", edit)
    _error(WeightsError, ckpt, "model.layers.0.self_attn.k_proj.weight", "model.safetensors",
           "[16, 64]", "[32, 64]")


def test_unexpected_tensor(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    _rewrite(ckpt / "model.safetensors", edit)
    _error(WeightsError, ckpt, "model.layers.0.self_attn.q_norm.weight", "model.safetensors", "unexpected")


def test_unexpected_layer_beyond_config(ckpt):
    def edit(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].clone()
    _rewrite(ckpt / "model.safetensors", edit)
    _error(WeightsError, ckpt, "model.layers.2.mlp.up_proj.weight", "unexpected")


@pytest.mark.parametrize("cut", ["half", "tail", "header"])
def test_truncated_file(ckpt, cut):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"half": data[: len(data) // 2], "tail": data[:-8], "header": data[:6]}[cut])
    _error(WeightsError, ckpt, "model.safetensors")


def test_truncated_shard(tmp_path):
    save_pretrained(tiny_model(seed=0), tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-4])
    _error(WeightsError, tmp_path, shard.name)


def test_shard_listed_in_index_but_missing(tmp_path):
    save_pretrained(tiny_model(seed=0), tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    _error(WeightsError, tmp_path, shard.name)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    _error(WeightsError, ckpt, "model.safetensors")


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _error(ModelConfigError, ckpt, "model_type", "gpt2", "config.json")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    _error(ModelConfigError, ckpt, "config.json")


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    model = tiny_model(seed=0, tie_word_embeddings=True)
    save_pretrained(model, tmp_path)

    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    _rewrite(tmp_path / "model.safetensors", edit)
    again = load_pretrained(path=tmp_path)
    assert again.lm_head.weight is again.embed.weight
    assert_bit_identical(model, again)


# ------------------------------------------------------------------------------------------------
# peak memory of loading

BUILD = textwrap.dedent("""
    import sys, torch
    from ftcore.model import ModelConfig, Transformer
    from ftcore.weights import save_pretrained
    out = sys.argv[1]
    def build(cfg, seed):
        with torch.device("meta"):
            m = Transformer(cfg)
        m.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02, generator=g)
        m.reset_buffers()
        return m
    # ~345 MB in fp32: 86M parameters, untied
    big = build(ModelConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2048, num_layers=6,
                            num_heads=16, num_kv_heads=4), 0)
    save_pretrained(big, out + "/fp32")
    save_pretrained(big, out + "/bf16", dtype=torch.bfloat16)
    save_pretrained(build(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                      num_heads=2, num_kv_heads=2), 1), out + "/tiny")
""")

# How the peak is measured. /proc/self/status has RssAnon (anonymous resident memory: what the
# loader allocates) and VmHWM (the peak of *all* resident memory, file pages included). safetensors
# mmaps checkpoint files: pages it reads count as RssFile, and a tensor of the file's dtype is a
# view of that mapping, never copied to anonymous memory. So VmHWM mixes in clean, reclaimable page
# cache and is not the loader's allocation; the kernel keeps no peak of RssAnon alone. We therefore
# sample RssAnon from a thread every ~0.2 ms (with a 0.1 ms GIL switch interval; torch releases the
# GIL in its copies) during the load. Sampling can only miss a transient that is allocated and freed
# within one interval; a copy of a tensor large enough to matter takes far longer than that to fault
# its pages in, and glibc keeps small freed blocks resident, so a missed peak would have to be both
# tiny and short. Before the baseline, the child loads a tiny checkpoint: the first model built on
# the meta device lazily imports ~900 modules (torch._refs, sympy: ~75 MB of Python objects) and
# maps libtorch code; that one-time cost does not scale with the model and is not "the load".
# VmHWM is also reset (clear_refs 5) at the baseline and reported; where the file's dtype is the
# target dtype the whole model is file pages, so there VmHWM growth is asserted too.
SLACK = 30 * 2**20

LOAD = textwrap.dedent("""
    import json, sys, threading, time
    import torch, ftcore.model, ftcore.weights

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    root, name, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    warm = ftcore.weights.load_pretrained(path=root + "/tiny", dtype=dtype)   # one-time costs
    with torch.no_grad():
        sum(float(p.sum()) for p in warm.parameters())
    del warm
    sys.setswitchinterval(1e-4)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], status()["RssAnon"])
            time.sleep(2e-4)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    time.sleep(0.05)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                   # VmHWM := current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base = status()
    model = ftcore.weights.load_pretrained(path=root + "/" + name, dtype=dtype)
    with torch.no_grad():                                  # make every parameter resident
        for p in model.parameters():
            p.sum()
    time.sleep(0.01)
    stop.set()
    th.join()
    end = status()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    print(json.dumps({"model_bytes": model_bytes, "base": base, "end": end, "peak_anon": max(peak[0], end["RssAnon"]),
                      "hwm_reset": hwm_reset}))
""")


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    subprocess.run([sys.executable, "-c", BUILD, str(root)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return root


def _measure(root, name, dtype):
    r = subprocess.run([sys.executable, "-c", LOAD, str(root), name, dtype], check=True, cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name,dtype", [("fp32", "float32"), ("bf16", "float32"), ("fp32", "bfloat16")],
                         ids=["fp32-as-fp32", "bf16-as-fp32", "fp32-as-bf16"])
def test_load_peak_memory(big_checkpoints, name, dtype):
    r = _measure(big_checkpoints, name, dtype)
    mb = r["model_bytes"]
    anon = r["peak_anon"] - r["base"]["RssAnon"]
    hwm = r["end"]["VmHWM"] - r["base"]["VmRSS"]
    print(f"\n{name} as {dtype}: model {mb / 2**20:.0f} MiB, peak RssAnon growth {anon / 2**20:.0f} MiB "
          f"({anon / mb:.2f}x), VmHWM growth {hwm / 2**20:.0f} MiB ({hwm / mb:.2f}x)")
    assert mb > 150 * 2**20
    assert anon <= 1.2 * mb + SLACK, (anon / mb, r)
    if name == "fp32" and dtype == "float32" and r["hwm_reset"]:
        assert hwm <= 1.2 * mb + SLACK, (hwm / mb, r)
