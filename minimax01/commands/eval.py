"""`python -m minimax01 eval niah|passkey|mrniah|ppl --checkpoint DIR ...` (see docs/evals.md)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import CLIError


def _ints(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["niah", "passkey", "mrniah", "ppl"],
                   help="niah: needle in a haystack; passkey: pass-key retrieval; mrniah: "
                        "multi-round dialogue retrieval; ppl: perplexity by position")
    p.add_argument("--checkpoint", required=True, help="HF-format checkpoint folder")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="retrieval: context lengths in characters (comma-separated; default "
                        "512,1024,2048, or train-length/4 .. 4x train-length)")
    p.add_argument("--train-length", type=int, default=None,
                   help="the model's training length: marks extrapolation (lengths past it) in "
                        "tables and plots; default retrieval lengths go up to 4x it")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="retrieval: where the fact sits, 0 = start, 1 = end")
    p.add_argument("--samples", type=int, default=2, help="retrieval: examples per grid cell")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--data", help="ppl: a UTF-8 text file")
    p.add_argument("--context", type=int, default=2048, help="ppl: window length in tokens")
    p.add_argument("--chunk", type=int, default=4096, help="ppl: tokens per forward inside a window")
    p.add_argument("--max-windows", type=int, default=None, help="ppl: evaluate at most N windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=["int8", "fp8", "none"],
                   help="int8 | fp8: 8-bit expert and attention weights (a 16-bit checkpoint is "
                   "quantised while loading); none: 16-bit only; default: as stored")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.add_argument("--plot", metavar="FILE.png", help="draw the length x depth heatmap and the "
                   "accuracy-by-length curve (retrieval) or loss by position (ppl); needs matplotlib")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..eval import evaluate_retrieval, perplexity
    from ..model import MiniMaxForCausalLM
    from ..tokenizer import load_tokenizer

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise CLIError(f"{ckpt} is not a checkpoint folder (no config.json)")
    if args.task == "ppl" and not args.data:
        raise CLIError("eval ppl needs --data FILE (a UTF-8 text file)")
    if args.task == "ppl" and not Path(args.data).is_file():
        raise CLIError(f"no such file: {args.data}")
    if args.samples < 1 or args.batch_size < 1:
        raise CLIError("--samples and --batch-size must be >= 1")
    if args.train_length is not None and args.train_length < 1:
        raise CLIError("--train-length must be >= 1")
    if args.plot:
        from ..eval.plots import _figure

        _figure(1, 1)  # fails now (matplotlib missing) rather than after the evaluation
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=dtype, device=device,
                                               quantization=args.quantization)
    tokenizer = load_tokenizer(ckpt)
    if args.task == "ppl":
        ids = tokenizer.encode(Path(args.data).read_text(encoding="utf-8"))
        windows = len(ids) // args.context
        if args.max_windows:
            windows = min(windows, args.max_windows)
        with tqdm(total=windows, desc="ppl windows", unit="win") as bar:
            result = perplexity(model, ids, args.context, args.chunk, args.max_windows, bar.update,
                                bucket_base=2)
        print(result.table())
        payload = {"task": "ppl", "tokens": result.tokens, "nll": result.nll, "ppl": result.ppl,
                   "train_length": args.train_length,
                   "buckets": [dict(lo=a, hi=b, nll=c, tokens=n) for a, b, c, n in result.buckets]}
        if args.plot:
            from ..eval.plots import ppl_figure, save_png

            save_png(ppl_figure({ckpt.name: result}, args.train_length), args.plot)
    else:
        from ..eval.retrieval import MIN_LENGTH, extrapolation_lengths

        task = {"niah": "needle"}.get(args.task, args.task)
        lengths = args.lengths or [n for n in (extrapolation_lengths(args.train_length)
                                               if args.train_length else [512, 1024, 2048])
                                   if n >= MIN_LENGTH[task]]
        if not lengths:
            raise CLIError(f"{args.task} examples need at least {MIN_LENGTH[task]} characters; "
                           f"give --lengths")
        total = len(lengths) * len(args.depths) * args.samples
        with tqdm(total=total, desc=f"{args.task}", unit="ex") as bar:
            result = evaluate_retrieval(model, tokenizer, task, lengths, args.depths,
                                        args.samples, args.seed, args.batch_size, bar.update,
                                        train_length=args.train_length)
        print(result.table())
        payload = result.to_dict()
        if args.plot:
            from ..eval.plots import retrieval_figure, save_png

            save_png(retrieval_figure([result], [args.task], f"{ckpt.name}: {args.task}"),
                     args.plot)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
