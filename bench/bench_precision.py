"""Where bf16 autocast starts to pay on this CPU: one ftcore training step (forward, backward,
clipping, AdamW) in fp32 and in bf16 autocast, over model widths, at the quickstart's shape
(vocab 2048, 4 layers, MLP 3x hidden, 16 x 256 tokens), beside what `train.precision = auto`'s
probe (ftcore/hardware.py) measures for the same width: the bound there (BF16_MAX_TIME_RATIO, a
probe ratio under which a whole step gains) comes from this table.

    python bench/bench_precision.py                       # labelled rows as in fine-tuning (25%)
    python bench/bench_precision.py --labelled 1.0        # every token labelled (pretraining)

Each width runs in this one process, fp32 and bf16 steps interleaved, median of --steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ftcore.config import Config  # noqa: E402
from ftcore.hardware import BF16_MAX_TIME_RATIO, MatmulShape, cpu_bf16_features, probe_rows, time_bf16_vs_fp32  # noqa: E402
from ftcore.model import IGNORE_INDEX, ModelConfig, Transformer  # noqa: E402
from ftcore.optim import build_optimizer  # noqa: E402
from ftcore.step import NonFiniteSkips, autocast_context, forward_backward, optimizer_step  # noqa: E402


def stepper(hidden: int, precision: str, args):
    cfg = ModelConfig(model_type="llama", vocab_size=args.vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_layers=args.layers, num_heads=max(hidden // 32, 1), num_kv_heads=max(hidden // 64, 1),
                      max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    run = Config()
    run.train.precision, run.train.loss = precision, args.loss
    torch.manual_seed(0)
    model = Transformer(cfg, loss=args.loss)
    model.init_weights(seed=0)
    opt, _ = build_optimizer(model, run, torch.device("cpu"))
    autocast = autocast_context(run, torch.device("cpu"))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    labels = ids.roll(-1, 1)
    labels[:, :int((1 - args.labelled) * args.seq_len)] = IGNORE_INDEX
    n = int((labels != IGNORE_INDEX).sum())
    skips = NonFiniteSkips(run, None)

    def step() -> float:
        t0 = time.perf_counter()
        loss_sum = forward_backward(model, [{"input_ids": ids, "labels": labels}], n, autocast)
        optimizer_step(model, opt, loss_sum, n, run.train.grad_clip, skips)  # what the loop runs
        return time.perf_counter() - t0
    return step, cfg.num_params()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="32,64,96,128,256,512")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--labelled", type=float, default=0.25, help="share of each row's tokens with a label")
    ap.add_argument("--loss", default="chunked")
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    print(f"CPU: {', '.join(cpu_bf16_features()) or 'no native bf16'}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.batch} x {args.seq_len} tokens, {args.labelled:.0%} labelled, "
          f"loss {args.loss}; command: python bench/bench_precision.py {' '.join(sys.argv[1:])}\n")
    print("| hidden | params | fp32 ms | bf16 autocast ms | step bf16 / fp32 | probe bf16 / fp32 | auto picks |\n"
          "|---|---|---|---|---|---|---|")
    for hidden in [int(h) for h in args.hidden.split(",")]:
        (fp32, n_params), (bf16, _) = stepper(hidden, "fp32", args), stepper(hidden, "bf16-autocast", args)
        for _ in range(2):  # warm-up: optimizer states, oneDNN's kernel choices
            fp32(), bf16()
        t32, t16 = [], []
        for _ in range(args.steps):
            t32.append(fp32())
            t16.append(bf16())
        a, b = statistics.median(t32) * 1e3, statistics.median(t16) * 1e3
        shape = MatmulShape(hidden, 3 * hidden, args.batch * args.seq_len)
        p32, p16 = time_bf16_vs_fp32(shape.hidden_size, shape.intermediate_size, probe_rows(shape))
        pick = "bf16-autocast" if p16 / p32 <= BF16_MAX_TIME_RATIO else "fp32"
        print(f"| {hidden} | {n_params / 1e6:.1f} M | {a:.0f} | {b:.0f} | {b / a:.2f} | {p16 / p32:.2f} | {pick} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
