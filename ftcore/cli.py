"""`ftcore train|eval|preview|generate|export|import-gguf|bench|plot`.

A user mistake (bad config, bad data, a checkpoint that does not match) ends with one line on
stderr and exit code 2, not a traceback.
"""
from __future__ import annotations

import argparse
import pathlib
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from ftcore.checkpoint import CheckpointError
    from ftcore.config import ConfigError
    from ftcore.data import DataError
    from ftcore.gguf import GGUFError
    from ftcore.model import ModelConfigError
    from ftcore.data.templates import TemplateError
    from ftcore.tokenizer import TokenizerError
    from ftcore.step import NonFiniteError
    from ftcore.weights import WeightsError
    return (CheckpointError, ConfigError, DataError, GGUFError, ModelConfigError, NonFiniteError, TemplateError,
            TokenizerError, WeightsError)


def cmd_train(args) -> int:
    from ftcore.config import load_config
    from ftcore.parallel import shutdown
    from ftcore.train import train
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    finally:
        shutdown()
    return 0


def cmd_eval(args) -> int:
    from ftcore.config import load_config
    from ftcore.evaluate import run_eval
    cfg = load_config(args.config, args.overrides)
    run_eval(cfg, args.model, out_dir=args.out)
    return 0


def cmd_preview(args) -> int:
    from ftcore.config import ConfigError, load_config
    from ftcore.preview import preview
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    preview(load_config(args.config, args.overrides), args.split, args.n, args.json)
    return 0


def cmd_generate(args) -> int:
    """Streams the continuation of args.prompt to stdout; the prompt is used verbatim (apply a
    template yourself if the model was fine-tuned on one)."""
    import torch

    from ftcore.config import ConfigError
    from ftcore.data.chat import end_of_turn_ids
    from ftcore.data.templates import TemplateError
    from ftcore.generate import TextStream, generate
    from ftcore.model import Transformer
    from ftcore.source import load_tokenizer

    if not (pathlib.Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: no config.json there (an HF model directory is needed)")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise ConfigError("--temperature must be >= 0 and --max-new-tokens >= 1")
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    if args.device not in ("auto", "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"--device {args.device!r}: use auto, cpu or cuda (cuda needs a CUDA device)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tok = load_tokenizer(args.model)
    try:  # a chat-formatted prompt's answer ends with its turn
        stop = tok.eos_ids + end_of_turn_ids(tok)
    except TemplateError as e:
        stop = tok.eos_ids
        print(f"(decoding stops at eos only: {e})", file=sys.stderr)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device).eval()
    prompt = tok.encode(args.prompt, add_bos=True)
    limit = model.config.max_position_embeddings
    if len(prompt) >= limit:
        raise ConfigError(f"the prompt is {len(prompt)} tokens, the model has {limit} positions "
                          f"(max_position_embeddings in {args.model}/config.json): shorten it")
    max_new = min(args.max_new_tokens, limit - len(prompt))
    if max_new < args.max_new_tokens:
        print(f"(--max-new-tokens cut to {max_new}: the model has {limit} positions)", file=sys.stderr)
    stream = TextStream(tok.decode)

    def on_token(row: int, token_id: int):
        sys.stdout.write(stream.push(token_id))
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    generate(model, [prompt], max_new, stop, tok.pad_id,
             temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_token=on_token)
    sys.stdout.write(stream.finish() + "\n")
    return 0


def cmd_export(args) -> int:
    from ftcore.export import export
    print(f"wrote {export(args.source, args.out, base=args.base, gguf_type=args.gguf_type)}")
    return 0


def cmd_import_gguf(args) -> int:
    from ftcore.config import ConfigError
    from ftcore.export import export
    from ftcore.gguf import is_gguf
    if not is_gguf(args.file):
        raise ConfigError(f"{args.file}: import-gguf reads a .gguf file")
    if is_gguf(args.out):
        raise ConfigError(f"--out {args.out}: import-gguf writes an HF directory; for GGUF to GGUF use ftcore export")
    print(f"wrote {export(args.file, args.out)}")
    return 0


def cmd_bench(args) -> int:
    from ftcore.config import ConfigError, load_config
    from ftcore.estimate import estimate_report
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    cfg = load_config(args.estimate, args.overrides)
    print(estimate_report(cfg, world_size=args.world_size))
    return 0


def cmd_plot(args) -> int:
    from ftcore.evaluation.plot import plot_runs
    print(plot_runs(args.run_dirs, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftcore", description="instruction fine-tuning in raw PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (and evaluate) as a config says")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="section.key=value (values parsed as TOML)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate base and fine-tuned models on the test split")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--model", action="append", required=True,
                   help="model directory; give it twice: --model BASE --model FINETUNED")
    e.add_argument("--out", default=None, help="report directory (default: run.dir for two models, "
                   "run.dir/eval-NAME for one, so a run's comparison is never replaced)")
    e.set_defaults(fn=cmd_eval)

    pv = sub.add_parser("preview", help="the first examples of a split as the model sees them, loss-carrying text marked")
    pv.add_argument("config")
    pv.add_argument("overrides", nargs="*")
    pv.add_argument("--split", default="train", choices=["train", "validation", "test"])
    pv.add_argument("--n", type=int, default=3, help="how many examples (default 3)")
    pv.add_argument("--json", action="store_true", help="one JSON object per line: text, input_ids, labels (-100: no loss)")
    pv.set_defaults(fn=cmd_preview)

    g = sub.add_parser("generate", help="decode from a prompt, streaming tokens")
    g.add_argument("--model", required=True, help="HF-format checkpoint directory (with tokenizer.json)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="a checkpoint, HF directory or GGUF file as an HF directory or a GGUF file")
    x.add_argument("source", help="RUN_DIR/checkpoints/step_XXXXXXXX, an HF directory (e.g. RUN_DIR/final) or a .gguf file")
    x.add_argument("--out", required=True, help="a directory (HF format), or FILE.gguf")
    x.add_argument("--gguf-type", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type of the matrices in a GGUF output (default f16; norms stay f32)")
    x.add_argument("--base", default=None, help="a checkpoint's base model (default: from the run's config.toml)")
    x.set_defaults(fn=cmd_export)

    ig = sub.add_parser("import-gguf", help="a GGUF file (llama.cpp, Ollama, LM Studio) as an HF directory")
    ig.add_argument("file", help="FILE.gguf (quantized tensors are dequantized to fp32)")
    ig.add_argument("--out", required=True, help="the HF directory to write")
    ig.set_defaults(fn=cmd_import_gguf)

    b = sub.add_parser("bench", help="memory estimate of a config (no GPU needed); timed runs: bench/")
    b.add_argument("--estimate", required=True, metavar="CONFIG")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--world-size", type=int, default=1)
    b.set_defaults(fn=cmd_bench)

    pl = sub.add_parser("plot", help="draw runs' loss, lr, tokens/s and memory curves, overlaid (needs matplotlib)")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", default=None, help="image path, its suffix the format (default with one run: "
                    "RUN_DIR/curves.png; needed with several)")
    pl.set_defaults(fn=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"ftcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # a checkpoint being written is left as .tmp and removed by the next start; finished ones are intact
        print(f"ftcore {args.command}: interrupted (the checkpoints already written are intact; "
              "train.resume=auto continues from the newest)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
