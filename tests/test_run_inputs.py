"""What a run caches in its directory is reused only when made from the same inputs: the
pretrained base/ (and its tokenizer) and the base model's evaluation (eval_base.json). A run
directory re-run with another seed, other data, another pretraining or another evaluation never
mixes two runs' numbers."""
from __future__ import annotations

import json

import pytest

from helpers import make_run_setup, run_cli, run_overrides

# the quickstart's path (no model.path: a base pretrained in the run directory), at a toy size
PRETRAIN = {"pretrain": {"steps": 2, "vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                         "num_kv_heads": 1, "intermediate_size": 64, "seq_len": 64, "batch_size": 2},
            "data": {"templates": '["rating"]', "max_seq_len": 96, "max_completion_tokens": 16},
            "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2, "device": "cpu",
                      "precision": "fp32", "loss": "torch"},
            "eval": {"base": "false", "final": "false"}, "checkpoint": {"export_final": "false"},
            "log": {"progress": "false"}}


def _pretrain_args(run_dir, **more) -> list[str]:
    values = {"run.dir": str(run_dir), "data.synthetic.num_records": "120"}
    for section, keys in PRETRAIN.items():
        values.update({f"{section}.{k}": v for k, v in keys.items()})
    values.update(more)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_a_base_pretrained_from_other_inputs_is_refused_not_reused(tmp_path):
    run = tmp_path / "run"
    first = run_cli(["train", "configs/tiny_cpu.toml", *_pretrain_args(run)])
    assert first.returncode == 0, first.stderr[-3000:]
    weights = (run / "base" / "model.safetensors").read_bytes()
    recorded = json.loads((run / "base" / "ftcore_inputs.json").read_text())
    assert recorded["run.seed"] == 0 and recorded["pretrain.steps"] == 2 and "eval.shots" not in recorded

    # another split seed, other data, another pretraining: one line naming the key, nothing run
    for key, value in (("run.seed", "1"), ("data.synthetic.num_records", "100"), ("pretrain.lr", "0.01"),
                       ("data.split", "[0.7, 0.2, 0.1]")):
        p = run_cli(["train", "configs/tiny_cpu.toml", *_pretrain_args(run, **{key: value})])
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert "pretrained by a run with other inputs" in lines[0] and key in lines[0], lines[0]
        assert "pretraining a base model" not in p.stdout
    assert (run / "base" / "model.safetensors").read_bytes() == weights

    # the same inputs: reused, said so, not pretrained again
    again = run_cli(["train", "configs/tiny_cpu.toml", *_pretrain_args(run)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrained earlier from the same inputs" in again.stdout and "pretraining a base model" not in again.stdout
    assert (run / "base" / "model.safetensors").read_bytes() == weights

    # a base of an ftcore that kept no record is not trusted either
    (run / "base" / "ftcore_inputs.json").unlink()
    p = run_cli(["train", "configs/tiny_cpu.toml", *_pretrain_args(run)])
    assert p.returncode == 2 and "no readable record of what it was pretrained from" in p.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("inputs"))


@pytest.mark.slow
def test_a_resume_with_another_evaluation_evaluates_the_base_again(setup, tmp_path):
    """eval.* may change on resume; the base's numbers must then cover the same examples as the
    fine-tuned model's, so the report keeps its paired intervals."""
    run = tmp_path / "run"
    common = dict(train=dict(max_steps=4), checkpoint=dict(every=2, export_final="true"),
                  eval=dict(base="true", final="true", max_examples=3, heldout="false", max_new_tokens=4))
    p = run_cli(["train", "configs/tiny_cpu.toml", *run_overrides(setup, run, common)])
    assert p.returncode == 0, p.stderr[-3000:]
    cached = json.loads((run / "eval_base.json").read_text())
    assert cached["inputs"]["eval.max_examples"] == 3 and cached["results"]["base"]["rating"]["examples"] == 3

    # the same config: resumed from step 2, the base's evaluation reused
    p = run_cli(["train", "configs/tiny_cpu.toml", *run_overrides(setup, run, common)])
    assert p.returncode == 0 and "resumed from" in p.stdout and "evaluating the base model again" not in p.stdout
    assert "evaluating " + str(setup / "base") not in p.stdout

    # more test examples: the base is evaluated again on them, and paired with the fine-tuned model
    p = run_cli(["train", "configs/tiny_cpu.toml", *run_overrides(setup, run, common, eval=dict(max_examples=5))])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "eval.max_examples 3 -> 5" in p.stdout
    report = json.loads((run / "eval.json").read_text())
    for task in ("rating", "summary"):
        assert report["base"][task]["examples"] == report["finetuned"][task]["examples"] == 5
        assert "base" in report["finetuned"][task]["vs"] and "no_intervals" not in report["finetuned"][task]
