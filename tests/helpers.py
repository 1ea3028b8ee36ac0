"""Small shared test utilities: tiny ftcore models, tiny Hugging Face reference checkpoints, the
norm-relative error. `transformers` is imported lazily (it is a slow, test-only reference)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ftcore.model import ModelConfig, Transformer

# GPU tests (`FTCORE_TEST_CUDA=1 pytest -m gpu`): they need triton compiled for the GPU, and
# conftest sets TRITON_INTERPRET=1 unless FTCORE_TEST_CUDA is set
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA, with FTCORE_TEST_CUDA=1 so that triton is not interpreted")


def needs_transformers():
    """The transformers module, or skip the calling test: it is the test-only reference (test
    extra), so tests that do not compare against it must run without it."""
    import pytest

    return pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values, so that norms and biases matter too: 1-D norm weights
    ~ 1 + N(0, std), everything else ~ N(0, std). Tied parameters are visited once."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if p.ndim == 1 and "norm" in name:
                r += 1.0
            p.copy_(r.to(p.dtype))
    return module


BF16_U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, one rounding moves a value <= 2^-8 relative


def bf16_loss_bound(num_layers: int) -> float:
    """How far (relative) a bf16 run's loss may sit from the fp32 run's: each bf16 rounding on the
    way from the tokens to the loss adds at most u = 2^-8 (to first order the relative errors add),
    and the way holds the embedding, six matmul outputs per block (q/k/v, the attention scores and
    their product with V, the output projection, gate/up, down) and the logits: (6 L + 2) u. This
    holds however a CPU or GPU rounds its products (AMX, AVX512-BF16, emulated on AVX2 only)."""
    return (6 * num_layers + 2) * BF16_U


def tiny_config(**kw) -> ModelConfig:
    """A tiny ftcore config (hidden 64, 2 layers, GQA 4/2 heads); keywords override."""
    base = dict(model_type="llama", vocab_size=131, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, std: float = 0.1, **kw) -> Transformer:
    """A tiny ftcore model with every parameter random (see randomize_), in eval mode."""
    model = Transformer(tiny_config(**kw))
    model.reset_buffers()
    return randomize_(model, seed=seed, std=std).eval()


def hf_tiny_config(model_type: str = "llama", **kw):
    """A tiny transformers config of `model_type` (same shape as tiny_config); keywords override."""
    from transformers import AutoConfig

    base = dict(vocab_size=131, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def make_hf_model(model_type: str = "llama", seed: int = 0, std: float = 0.1,
                  attn_implementation: str = "eager", **kw):
    """A randomly initialised transformers causal LM (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_tiny_config(model_type, **kw)
    cfg._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return randomize_(model, seed=seed, std=std).eval()


def make_hf_checkpoint(path, model_type: str = "llama", seed: int = 0, max_shard_size=None, **kw):
    """Save a random tiny transformers model to `path` (safetensors; sharded with an index when
    max_shard_size, e.g. "20KB", is given) and return the model."""
    model = make_hf_model(model_type, seed=seed, **kw)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **extra)
    return model


def hf_grads_by_our_name(hf_model) -> dict[str, torch.Tensor]:
    """{ftcore parameter name: grad} of a transformers model, through ftcore's name mapping."""
    from ftcore.weights import hf_to_ours

    out = {}
    for name, p in hf_model.named_parameters():
        ours = hf_to_ours(name)
        assert ours is not None, f"no ftcore name for {name}"
        out[ours] = p.grad
    return out


def make_run_setup(root, n_records: int = 96, vocab_size: int = 384, hidden_size: int = 32):
    """A directory for in-process training runs: reviews.jsonl (the embedded generator) and base/,
    a tiny HF checkpoint with a BPE tokenizer trained on those reviews."""
    import json

    from ftcore.data.reviews import generate_reviews, pretraining_texts
    from ftcore.tokenizer import Tokenizer
    from ftcore.weights import save_pretrained

    root.mkdir(parents=True, exist_ok=True)
    records = generate_reviews(n_records, 0)
    (root / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer.train_bpe(pretraining_texts(records), vocab_size)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_pretrained(model, root / "base", tokenizer=tok)
    return root


_COMPILE_BUILDS = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for kernel, sig, consts in builds:
    try:
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    except TypeError:
        sys.exit(3)  # another triton's compile API
    for arch in (80, 90):
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                         options=dict(num_warps=8)).asm
"""


def compile_for_gpu_or_skip(builds_source: str) -> None:
    """Compile Triton kernels for sm_80 and sm_90 in a subprocess without TRITON_INTERPRET.
    `builds_source` defines `builds = [(kernel, signature, constexprs), ...]`. The interpreter
    forgives what the compiler does not (types changing across branches, unsupported calls);
    triton's bundled ptxas catches that with no GPU."""
    script = builds_source + _COMPILE_BUILDS
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("this triton's ASTSource takes other arguments")
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]


# the short fine-tuning run most tests start from: the tiny base of make_run_setup, 6 steps on CPU
RUN_DEFAULTS = {
    "data": {"templates": '["rating", "summary"]', "max_seq_len": 128, "max_completion_tokens": 64},
    # fp32 unless a test asks: "auto" would depend on the CPU the suite runs on
    "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2,
              "device": "cpu", "precision": "fp32"},
    "eval": {"base": "false", "final": "false"},
    "checkpoint": {"export_final": "false"},
    "log": {"progress": "false"},
}


def run_overrides(setup, run_dir, *more: dict, **sections: dict) -> list[str]:
    """`section.key=value` overrides for a run in run_dir on make_run_setup's base and data:
    RUN_DEFAULTS, then each dict of `more` ({section: {key: value}}), then the keyword sections,
    later ones winning, e.g. run_overrides(setup, run, common, train=dict(max_steps=4))."""
    values = {"run.dir": str(run_dir), "model.path": str(Path(setup) / "base"),
              "data.path": str(Path(setup) / "reviews.jsonl")}
    for layer in (RUN_DEFAULTS, *more, sections):
        for section, keys in layer.items():
            values.update({f"{section}.{key}": value for key, value in keys.items()})
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(args: list[str], nproc: int = 0, timeout=240, env_extra=None):
    """`ftcore ARGS` in a subprocess from the repository root, under torchrun with nproc processes
    (gloo on the CPU) when nproc > 0; one OpenMP thread per process."""
    import os
    import random
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(random.randint(20000, 40000)), "-m", "ftcore.cli", *args]
    else:
        cmd = [sys.executable, "-m", "ftcore.cli", *args]
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout)


FAULTY_CLI = [str(Path(__file__).resolve().parent / "faulty_cli.py")]  # ftcore with faults injected


def run_ranks(args: list[str], nranks: int = 2, timeout=120, env_extra=None, cli=("-m", "ftcore.cli")) -> list[tuple[int, str, str]]:
    """`ftcore ARGS` as nranks processes that find each other through RANK / WORLD_SIZE / MASTER_*
    (no torchrun: its agent stops the other ranks once one fails, and here each rank's own ending
    is the point). [(returncode, stdout, stderr)] per rank; a rank that hangs hits the timeout.
    cli: FAULTY_CLI for ftcore with faults injected."""
    import os
    import random
    import subprocess
    import sys
    port = random.randint(20000, 40000)
    procs = [subprocess.Popen([sys.executable, *cli, *args], cwd=Path(__file__).resolve().parents[1],
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nranks),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                       **(env_extra or {})))
             for r in range(nranks)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


PROMPTSOURCE_SDIST = os.environ.get("FTCORE_PROMPTSOURCE_SDIST", "")


def promptsource_files() -> dict[str, str]:
    """{path in the archive: text} of every templates.yaml in promptsource's sdist (0.2.3: 279 files,
    Apache-2.0), read from the archive that FTCORE_PROMPTSOURCE_SDIST names; `.ci/run` downloads it
    (promptsource no longer installs on Python >= 3.10, its sdist still downloads). Without it the
    calling test skips, and fails under CI: the real files must be checked there."""
    import tarfile

    if not Path(PROMPTSOURCE_SDIST).is_file():
        why = ("FTCORE_PROMPTSOURCE_SDIST names no file: set it to promptsource-0.2.3.tar.gz (.ci/run fetches it with "
               "pip download --no-deps --python-version 3.9 --no-binary :all: promptsource==0.2.3)")
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    with tarfile.open(PROMPTSOURCE_SDIST) as tar:
        return {m.name: tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers()
                if m.isfile() and m.name.endswith("/templates.yaml")}
