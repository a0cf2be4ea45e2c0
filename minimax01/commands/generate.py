"""`python -m minimax01 generate --checkpoint DIR --prompt TEXT [sampling options]`: load a
checkpoint and its tokenizer, continue the prompt, print the continuation to stdout as it is
generated (each piece flushed; stats on stderr). A MiniMax-VL-01 checkpoint (config.json
`model_type` minimax_vl_01) takes `--image FILE` (repeatable): each `<image>` of the prompt is
one image, in order (without any, the images go first); only the prefill sees the pixels.

`--tensor-parallel N` starts N ranks (or runs as one under torchrun), each loading its slices;
every rank runs the same `generate()` loop on the all-gathered logits with the same seed (rank
0's, broadcast), so all sample the same tokens and stop together; rank 0 prints."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ..cli import CLIError
from .tp_ranks import add_tp_arguments, check_before_launch, read_config, tp_mode


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="cut the output at this text (repeatable); generation also ends at "
                             "the tokenizer's end-of-sequence token")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not put the tokenizer's begin-of-sequence token before the prompt")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("--quantization", default=None, choices=["int8", "fp8", "none"],
                        help="int8 | fp8: 8-bit expert and attention weights (a 16-bit "
                             "checkpoint is quantised while loading); none: 16-bit only; "
                             "default: as stored")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image for a MiniMax-VL-01 checkpoint (repeatable; one per "
                             "<image> in the prompt)")
    add_tp_arguments(parser)


def _check(args) -> None:
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not (0.0 < args.top_p <= 1.0):
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not Path(args.checkpoint).exists():
        raise CLIError(f"no checkpoint at {args.checkpoint}")
    if not args.prompt:
        raise CLIError("--prompt is empty")


def run(args) -> int:
    import torch

    from ..model import MiniMaxForCausalLM
    from ..tokenizer import load_tokenizer

    _check(args)
    vl = _is_vl(args.checkpoint)
    if args.image and not vl:
        raise CLIError(f"--image: {args.checkpoint} is a text model (its config.json model_type "
                       f"is not minimax_vl_01)")
    mode = tp_mode(args)
    if vl and mode != "single":
        raise CLIError("--tensor-parallel is not supported for MiniMax-VL-01 checkpoints yet")
    if mode == "launch":
        from ..infer.ranks import launch

        check_before_launch(args, read_config(args))
        return launch(args._argv, args.tensor_parallel)
    if mode == "rank":
        return _run_rank(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    start = time.perf_counter()
    if vl:
        from ..vision.model import MiniMaxVLForConditionalGeneration

        if args.quantization not in (None, "none"):
            raise CLIError("--quantization is not supported for MiniMax-VL-01 checkpoints yet")
        model = MiniMaxVLForConditionalGeneration.from_pretrained(args.checkpoint,
                                                                  dtype=args.dtype, device=device)
    else:
        model = MiniMaxForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype,
                                                   device=device, quantization=args.quantization)
    tokenizer = load_tokenizer(args.checkpoint)
    return _generate(args, model, tokenizer, device, start, args.seed, True)


def _is_vl(checkpoint: str) -> bool:
    import json

    from ..vision.config import VL_MODEL_TYPE

    try:
        cfg = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the loader says what is wrong
    return isinstance(cfg, dict) and cfg.get("model_type") == VL_MODEL_TYPE


def _images(args, model):
    """(ids, pixel_values, image_sizes) of the prompt with its --image files."""
    from ..vision import ImageError, ImageProcessor, encode_with_images, load_image
    from ..vision.chat import IMAGE_PLACEHOLDER

    n = args.prompt.count(IMAGE_PLACEHOLDER)
    if n and n != len(args.image):
        raise CLIError(f"--prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) for "
                       f"{len(args.image)} --image file(s)")
    processor = ImageProcessor.from_config(model.config)
    try:
        batch = processor([load_image(f, processor.max_pixels, what=f"--image {f}")
                           for f in args.image])
    except ImageError as e:
        raise CLIError(str(e)) from None
    return batch["pixel_values"], batch["image_sizes"], lambda tokenizer: encode_with_images(
        tokenizer, args.prompt, batch["image_sizes"], processor, model.config.image_token_index,
        add_bos=not args.no_bos)


def _run_rank(args) -> int:
    """One tensor-parallel rank: the same loop everywhere, rank 0 writes."""
    import torch
    import torch.distributed as dist

    from ..infer.tp_engine import finish_tensor_parallel, init_tensor_parallel
    from ..tokenizer import load_tokenizer
    from .tp_ranks import rank_model

    start = time.perf_counter()
    tp, _, device = init_tensor_parallel(args.device, args.tp_timeout)
    model = rank_model(args, tp, device)
    tokenizer = load_tokenizer(args.checkpoint)
    seed = torch.tensor([args.seed if args.seed is not None else
                         int(torch.randint(0, 2 ** 62, ()).item())], device=device)
    dist.broadcast(seed, 0)  # the same draws on every rank (the logits are the same bytes)
    code = _generate(args, model, tokenizer, device, start, int(seed.item()), tp.rank == 0)
    finish_tensor_parallel(tp)
    return code


def _generate(args, model, tokenizer, device, start, seed, output: bool) -> int:
    import torch

    from ..infer.detok import TextStream
    from ..infer.generate import generate

    loaded = time.perf_counter()
    images = {}
    if hasattr(model, "embed"):  # MiniMax-VL-01: the images' tokens in the prompt
        pixel_values, image_sizes, encode = _images(args, model)
        ids = encode(tokenizer)
        images = {"pixel_values": pixel_values, "image_sizes": image_sizes}
    else:
        ids = tokenizer.encode(args.prompt, add_bos=not args.no_bos)
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise CLIError(f"the tokenizer gives token id {max(ids)} but the model's vocabulary has "
                       f"{vocab} entries: tokenizer and checkpoint do not belong together")
    stream = TextStream(tokenizer, args.stop)  # stop texts are cut, and end generation
    eos = tokenizer.eos_id
    new: list[int] = []

    def write(text: str) -> None:
        if text and output:
            sys.stdout.write(text)
            sys.stdout.flush()

    def on_token(tokens) -> bool:
        token = int(tokens[0])
        if token == eos:
            return True
        new.append(token)
        write(stream.push(token))
        return stream.stopped

    write(args.prompt if args.echo else "")
    generate(model, torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
             stop_tokens=[eos] if eos is not None else None, on_token=on_token, **images)
    write(stream.finish() + "\n")
    done = time.perf_counter()
    if output:
        print(f"[{len(ids)} prompt + {len(new)} new tokens; load {loaded - start:.1f}s, generate "
              f"{done - loaded:.2f}s, {len(new) / max(done - loaded, 1e-9):.1f} tok/s]",
              file=sys.stderr)
    return 0
