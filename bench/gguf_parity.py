"""A GGUF file read by ftcore against transformers' own GGUF reader, on real text: logits, token
ids (every text of a JSONL file), the chat template, and `ftcore import-gguf`'s time and memory.

    python bench/gguf_parity.py SmolLM2-135M-Instruct.Q4_1.gguf --texts ../shared/data/amazon_fine_food_sample.jsonl

Where the token ids differ, the model itself says which tokenization it was trained on: the
log-likelihood of the same text under each (higher is the one it learned).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftcore.model import Transformer  # noqa: E402
from ftcore.tokenizer import Tokenizer  # noqa: E402

IMPORT_PEAK = """
import sys, time
from ftcore.memory import PeakRSSGrowth
from ftcore.export import export
t0 = time.perf_counter()
with PeakRSSGrowth() as rss:
    export(sys.argv[1], sys.argv[2], progress=False)
print(rss.growth_bytes, time.perf_counter() - t0)
"""


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--texts", required=True, help="JSONL with a 'text' field per line")
    ap.add_argument("--logit-texts", type=int, default=8)
    args = ap.parse_args()
    import transformers
    path = Path(args.gguf).resolve()
    texts = [json.loads(line)["text"] for line in open(args.texts, encoding="utf-8")]

    ours = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    errs = []
    with torch.no_grad():
        for text in texts[:args.logit_texts]:
            ids = torch.tensor([tok.encode(text)[:256]])
            errs.append(rel_err(ours(ids), hf(ids).logits))
    print(f"logits, fp32, {len(errs)} texts of {args.texts} (<= 256 tokens): max rel. error {max(errs):.2e}")

    mine = tok.encode_batch(texts)
    other = [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
    differ = [i for i, (a, b) in enumerate(zip(mine, other)) if a != b]
    print(f"token ids: {len(texts) - len(differ)} of {len(texts)} texts identical to transformers' GGUF tokenizer")
    if differ:
        def nll(ids):
            x = torch.tensor([[tok.bos_id if tok.bos_id is not None else tok.eos_id] + ids])
            with torch.no_grad():
                lp = ours(x[:, :-1]).float().log_softmax(-1)
            return -lp[0].gather(-1, x[0, 1:, None]).sum().item()
        ours_better = sum(nll(mine[i]) < nll(other[i]) for i in differ)
        gain = sum(nll(other[i]) - nll(mine[i]) for i in differ)
        print(f"  the {len(differ)} that differ: the model finds ftcore's tokenization more likely in {ours_better}, "
              f"transformers' in {len(differ) - ours_better} (total {gain:.1f} nats in favour of ftcore's)")
        i = differ[0]
        k = next(j for j in range(min(len(mine[i]), len(other[i]))) if mine[i][j] != other[i][j])
        print(f"  first difference, text {i}: ftcore {[tok.tok.id_to_token(t) for t in mine[i][k:k + 3]]}, "
              f"transformers {theirs.convert_ids_to_tokens(other[i][k:k + 3])}")
    messages = [{"role": "user", "content": texts[0]}]
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", IMPORT_PEAK, str(path), tmp + "/hf"], capture_output=True, text=True,
                           cwd=ROOT, check=True)
        growth, seconds = r.stdout.split()
        imported = transformers.AutoTokenizer.from_pretrained(tmp + "/hf")
        same = imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    print(f"chat template of the imported directory renders as transformers' GGUF tokenizer does: {same}")
    fp32 = ours.config.num_params() * 4
    print(f"ftcore import-gguf: {float(seconds):.1f} s, peak resident memory grew {int(growth) / 2**20:,.0f} MiB "
          f"= {int(growth) / fp32:.2f}x the fp32 model ({fp32 / 2**20:,.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
