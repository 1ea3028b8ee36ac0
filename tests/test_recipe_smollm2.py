"""configs/smollm2_reviews_cpu.toml, the real-model recipe, run end to end on a stand-in: a tiny
Llama written as a GGUF file by this test (ChatML template and tokens, as SmolLM2's), reviews in
Kaggle's Reviews.csv layout, a few steps and examples. The path is the recipe's: the GGUF read
directly, prompts in the model's chat template, base zero- and 3-shot, fine-tune, intervals and
paired verdicts in the report, final/ and its q8_0 GGUF."""
from __future__ import annotations

import csv
import json

import pytest

from ftcore.export import export
from ftcore.model import ModelConfig, Transformer
from ftcore.data.reviews import generate_reviews
from ftcore.tokenizer import Tokenizer
from ftcore.weights import save_pretrained
from helpers import make_run_setup, randomize_, run_cli

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.slow
def test_the_recipe_runs_its_whole_path_on_a_tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    from tokenizers import AddedToken
    setup = make_run_setup(tmp_path / "setup")
    t = Tokenizer.from_dir(setup / "base")
    t.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<|im_start|>", "<|im_end|>")])
    tok = Tokenizer(t.tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", add_bos=False,
                    config={"chat_template": CHATML})
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg)
    model.reset_buffers()
    randomize_(model, std=0.02)
    save_pretrained(model, tmp_path / "hf", tokenizer=tok)
    gguf_file = export(str(tmp_path / "hf"), str(tmp_path / "tiny-instruct.gguf"), gguf_type="q8_0", progress=False)

    reviews = tmp_path / "Reviews.csv"
    with open(reviews, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Id", "ProductId", "UserId", "ProfileName", "HelpfulnessNumerator", "HelpfulnessDenominator",
                    "Score", "Time", "Summary", "Text"])
        for r in generate_reviews(80, 0):
            w.writerow([r["id"] + 1, "", "", "", "", "", r["rating"], "", r["summary"], r["text"].replace(". ", ".<br />", 1)])

    run = tmp_path / "run"
    p = run_cli(["train", "configs/smollm2_reviews_cpu.toml", f"run.dir={run}", f"model.path={gguf_file}",
                 f"data.path={reviews}", "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4",
                 "eval.max_examples=6", "eval.max_heldout_examples=3", "eval.batch_size=4", "eval.max_new_tokens=4",
                 "log.progress=false", "data.max_seq_len=192", "data.max_completion_tokens=16"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prompts in the chat_template of " in p.stdout and "time per phase" in p.stdout
    results = json.loads((run / "eval.json").read_text())
    assert list(results) == ["baseline", "base", "base_kshot", "finetuned"]
    for task in ("rating", "sentiment", "summary"):
        ft = results["finetuned"][task]
        metric = "rougeL" if task == "summary" else "macro_f1"
        assert len(ft[f"{metric}_ci"]) == 2 and set(ft["vs"]) == {"baseline", "base", "base_kshot"}
        assert results["base_kshot"][task]["examples"] == 6
    assert results["finetuned"]["rating@heldout1"]["examples"] == 3
    assert (run / "final" / "model-q8_0.gguf").is_file() and (run / "final" / "model.safetensors").is_file()
    assert json.loads((run / "final" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    prompts = [json.loads(line)["prompt"] for line in (run / "generations" / "base_kshot.jsonl").read_text().splitlines()]
    assert prompts and not any("<br" in p for p in prompts)  # data.clean = "html"
