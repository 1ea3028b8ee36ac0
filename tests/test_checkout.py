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



# run from a folder outside the checkout by the wheel's own console script's interpreter: every
# module of the installed package imports (optional extras aside), and from the installed copy
IMPORT_ALL = """
import importlib, pkgutil, sys, ftcore
OPTIONAL = {"triton", "gguf", "matplotlib", "tensorboard", "transformers"}  # extras, not in install_requires
site = sys.argv[1]
assert ftcore.__file__.startswith(site), ftcore.__file__
names = [m.name for m in pkgutil.walk_packages(ftcore.__path__, "ftcore.")]
for name in names:
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        assert e.name.split(".")[0] in OPTIONAL, (name, e)
        continue
    assert mod.__file__.startswith(site), (name, mod.__file__)
print(len(names), "modules")
"""


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_outside_the_checkout(tmp_path):
    """`pip install .` / a built wheel holds every subpackage (setup.py finds them), and the console
    script works from a fresh venv in a folder that is not the checkout. The fresh venv borrows
    this environment's dependencies (torch & co.) through a path entry instead of downloading them,
    and the wheel goes in with --ignore-installed, so nothing of the checkout's editable install
    can stand in for it."""
    import sysconfig
    import venv
    import zipfile
    import shutil
    # built from a copy: setuptools reuses a build/ folder left in the source tree, whose stale files
    # would end up in the wheel whatever setup.py says now
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", ".git", "runs", "models", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("ftcore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT) for p in (ROOT / "ftcore").rglob("__init__.py")]
    missing = [str(p) for p in packages if f"{p.as_posix()}/__init__.py" not in names]
    missing += [f"kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py") if f"ftcore/kernels/{p.name}" not in names]
    assert not missing, f"the wheel lacks {missing}"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    fresh_site = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    (Path(fresh_site) / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "tiny.toml").write_text((ROOT / "configs" / "tiny_cpu.toml").read_text())
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(bin_dir / "python"), "-c", IMPORT_ALL, fresh_site], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run = subprocess.run([str(bin_dir / "ftcore"), "train", "tiny.toml", "run.dir=run", "log.progress=false",
                          "pretrain.steps=3", "pretrain.hidden_size=32", "pretrain.intermediate_size=64",
                          "pretrain.num_layers=1", "data.synthetic.num_records=200", "train.max_steps=2",
                          "train.precision=fp32", "eval.max_examples=2", "eval.shots=0", "eval.max_new_tokens=4",
                          "eval.every=0"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "run" / "eval.md").is_file() and (work / "run" / "final" / "model.safetensors").is_file()
