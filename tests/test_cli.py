"""User mistakes end with one line on stderr and exit code 2, and nothing written is corrupted."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ftcore.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "configs/tiny_cpu.toml", "train.foo=1"], "unknown key 'train.foo'; valid keys in [train]:"),
    (["train", "configs/tiny_cpu.toml", "train.lr=fast"], "'train.lr' must be float, got str 'fast'"),
    (["train", "configs/tiny_cpu.toml", "train.precision=fp16"], "'train.precision' must be one of"),
    (["train", "configs/tiny_cpu.toml", "train.global_batch_size=10", "train.micro_batch_size=4"],
     "train.global_batch_size=10 is not a multiple of train.micro_batch_size=4"),
    (["train", "configs/no_such.toml"], "config file not found: configs/no_such.toml"),
    (["train", "configs/tiny_cpu.toml", "model.path=/nonexistent"], "model.path='/nonexistent': no config.json there"),
])
def test_config_mistakes_are_one_line(args, message, tmp_path):
    r = _cli(*args, f"run.dir={tmp_path / 'run'}") if args[1] != "configs/no_such.toml" else _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bad_data_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"rating": 5, "summary": "ok", "text": "fine"}\n{"rating": 4, "summary": \n')
    r = _cli("train", "configs/tiny_cpu.toml", f"data.path={bad}", f"run.dir={tmp_path / 'run'}", "pretrain.steps=1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2" in lines[0], r.stderr
