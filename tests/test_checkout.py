"""A checkout's root on sys.path (`python -m pytest`, `python -c`, a script in the root) must not
shadow an installed package: transformers imports the PyPI package `kernels` whenever it is
installed, and the repository's top-level kernels/ folder must never be what it gets."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import needs_transformers

ROOT = Path(__file__).resolve().parents[1]

FROM_THE_ROOT = """
import importlib.util, pathlib, sys
import transformers, ftcore.kernels
from ftcore.kernels import get_loss, linear_cross_entropy
root = pathlib.Path.cwd().resolve()
spec = importlib.util.find_spec("kernels")
where = [] if spec is None else [spec.origin] if spec.origin else list(spec.submodule_search_locations)
assert not any(pathlib.Path(w).resolve().is_relative_to(root) for w in where), where
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(cfg)
print("ok", sum(p.numel() for p in model.parameters()), where)
"""


def test_the_top_level_kernels_folder_is_not_a_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    assert not list(ROOT.glob("kernels.py"))


def test_transformers_models_import_from_the_checkout_root():
    needs_transformers()
    p = subprocess.run([sys.executable, "-c", FROM_THE_ROOT], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("ok ")
    if importlib.util.find_spec("kernels") is not None:  # the PyPI package, from here too
        assert "site-packages" in p.stdout or "dist-packages" in p.stdout, p.stdout


def test_ftcore_kernels_spans_the_package_and_the_top_level_folder():
    import ftcore.kernels
    from ftcore.kernels import linear_cross_entropy, testing
    assert Path(ftcore.kernels.__file__).parent == ROOT / "ftcore" / "kernels"
    assert Path(testing.__file__).parent == ROOT / "kernels"
    assert callable(linear_cross_entropy)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("ftcore.kernels.no_such_kernel")

