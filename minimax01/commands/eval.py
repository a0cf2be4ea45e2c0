"""`python -m minimax01 eval niah|passkey|ppl --checkpoint DIR ...`"""

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
    p.add_argument("task", choices=["niah", "passkey", "ppl"],
                   help="niah: needle in a haystack; passkey: pass-key retrieval; ppl: perplexity")
    p.add_argument("--checkpoint", required=True, help="HF-format checkpoint folder")
    p.add_argument("--lengths", type=_ints, default=[512, 1024, 2048],
                   help="retrieval: context lengths in characters (comma-separated)")
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
            result = perplexity(model, ids, args.context, args.chunk, args.max_windows, bar.update)
        print(result.table())
        payload = {"task": "ppl", "tokens": result.tokens, "nll": result.nll, "ppl": result.ppl,
                   "buckets": [dict(lo=a, hi=b, nll=c, tokens=n) for a, b, c, n in result.buckets]}
    else:
        task = "needle" if args.task == "niah" else "passkey"
        total = len(args.lengths) * len(args.depths) * args.samples
        with tqdm(total=total, desc=f"{args.task}", unit="ex") as bar:
            result = evaluate_retrieval(model, tokenizer, task, args.lengths, args.depths,
                                        args.samples, args.seed, args.batch_size, bar.update)
        print(result.table())
        payload = result.to_dict()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    return 0
