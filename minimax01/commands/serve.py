"""`python -m minimax01 serve --checkpoint DIR [--host 127.0.0.1 --port 8000]`: an
OpenAI-compatible HTTP server (see docs/inference.md). `--preset NAME` serves randomly
initialised weights instead, for trying the server without a checkpoint.

`--tensor-parallel N` starts N ranks here (infer/ranks.py) -- or runs as one of them under
torchrun -- each holding its slice of the model; rank 0 serves HTTP and schedules, the others
follow its steps (infer/tp_engine.py)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..cli import CLIError
from ..infer.media import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES
from ..infer.prefix_cache import DEFAULT_BLOCK_SIZE, DEFAULT_PREFIX_CACHE_GIB
from ..infer.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS
from .tp_ranks import add_tp_arguments, check_before_launch, read_config, tp_mode


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (weights + tokenizer)")
    src.add_argument("--preset", metavar="NAME",
                     help="serve random weights of a preset (debug, demo, ...), byte tokenizer")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("--quantization", default=None, choices=["int8", "fp8", "none"],
                        help="int8 | fp8: 8-bit expert and attention weights (a 16-bit "
                             "checkpoint is quantised while loading); none: 16-bit only; "
                             "default: as stored")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="tokens per sequence, prompt + output (default 32768 on GPU, "
                             "4096 on CPU)")
    parser.add_argument("--num-slots", type=int, default=None, metavar="N",
                        help="concurrent sequences (default: as many as fit in GPU memory; 8 on "
                             "CPU)")
    parser.add_argument("--max-num-batched-tokens", "--prefill-chunk", type=int, default=None,
                        metavar="N", dest="max_num_batched_tokens",
                        help="prompt tokens per engine step, on top of every running decode: "
                             "long prompts are prefilled in chunks of at most N (default "
                             f"{DEFAULT_MAX_NUM_BATCHED_TOKENS}; --prefill-chunk is its old name)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="do not cache prompt prefixes (default: a new request resumes from "
                             "the longest cached prefix)")
    parser.add_argument("--prefix-cache-gb", type=float, default=DEFAULT_PREFIX_CACHE_GIB,
                        metavar="GB", help="memory for cached prefixes, per GPU (default "
                                           f"{DEFAULT_PREFIX_CACHE_GIB:g}; LRU-evicted)")
    parser.add_argument("--kv-page-size", type=int, default=None, metavar="N",
                        help="keep the softmax layers' K/V in pages of N tokens, so sequences "
                             "take memory for their actual length (default: off, a max-context "
                             "slot each)")
    parser.add_argument("--prefix-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                        help="tokens per prefix-cache block: prefixes resume at multiples of N "
                             f"(default {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                        help="fraction of free GPU memory the engine may use (default 0.9)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--api-key", default=os.environ.get("MINIMAX01_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes "
                             "(default: $MINIMAX01_API_KEY; none: open)")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send (default: the checkpoint folder's name)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template file (default: the tokenizer's, else a plain "
                             "<|role|> format)")
    parser.add_argument("--graceful-timeout", type=float, default=10.0, metavar="S",
                        help="on SIGTERM, seconds running requests may go on before each gets a "
                             "final error event (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling (and of "
                                                            "--preset weights)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    media = parser.add_argument_group("images (MiniMax-VL-01 checkpoints)")
    media.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="image_url may be file:// paths inside DIR (default: no local files; "
                            "http(s) URLs are never fetched)")
    media.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, metavar="N",
                       help=f"largest encoded image (default {MAX_IMAGE_BYTES})")
    media.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                       help=f"largest width x height (default {MAX_IMAGE_PIXELS})")
    media.add_argument("--max-images", type=int, default=MAX_IMAGES, metavar="N",
                       help=f"images per request (default {MAX_IMAGES})")
    add_tp_arguments(parser)


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise CLIError(f"--{name} must be positive, got {value}")


def _template(args) -> str | None:
    if not args.chat_template:
        return None
    path = Path(args.chat_template)
    if not path.is_file():
        raise CLIError(f"--chat-template: no file at {path}")
    return path.read_text()


def _media(args):
    from ..infer.media import MediaPolicy

    try:
        return MediaPolicy(args.max_image_bytes, args.max_image_pixels, args.max_images,
                           args.allowed_local_media_path)
    except ValueError as e:
        field, why = str(e).split(": ", 1)
        flag = {"allowed_local_path": "allowed-local-media-path"}.get(field,
                                                                       field.replace("_", "-"))
        raise CLIError(f"--{flag}: {why}") from None


def _is_vl(checkpoint) -> bool:
    """Whether the folder holds MiniMax-VL-01 (config.json's model_type minimax_vl_01)."""
    import json

    try:
        cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the loader explains what is wrong with the folder
    return isinstance(cfg, dict) and cfg.get("model_type") == "minimax_vl_01"


def _vl_presets():
    from ..vision import VL_PRESETS

    return VL_PRESETS


def _quantize(model, quantization) -> None:
    if quantization not in (None, "none"):
        from ..quant import quantize_model

        quantize_model(model, quantization)


def _exit_now(code: int) -> None:
    """End a tensor-parallel rank after its orderly shutdown without running the interpreter's
    teardown: c10d's background threads can still be alive while C++ statics are destroyed,
    which aborts ("terminate called without an active exception", seen once in CI)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check(args) -> None:
    for name in ("max-context", "num-slots", "max-num-batched-tokens", "prefix-block-size",
                 "kv-page-size"):
        _positive(name, getattr(args, name.replace("-", "_")))
    _media(args)
    if not 0 <= args.prefix_cache_gb < 1 << 20:
        raise CLIError(f"--prefix-cache-gb must be a number of GiB >= 0, got "
                       f"{args.prefix_cache_gb}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise CLIError(f"--gpu-memory-utilization must be in (0, 1], got "
                       f"{args.gpu_memory_utilization}")
    if not 0 <= args.graceful_timeout <= 3600:
        raise CLIError(f"--graceful-timeout must be in [0, 3600] seconds, got "
                       f"{args.graceful_timeout}")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")


def scheduling_kwargs(args) -> dict:
    """The Engine's scheduling and prefix-cache arguments from the command line."""
    return dict(max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                prefix_cache=not args.no_prefix_cache, prefix_cache_gb=args.prefix_cache_gb,
                prefix_block_size=args.prefix_block_size, kv_page_size=args.kv_page_size)


def run(args) -> int:
    import torch

    from ..infer.engine import Engine, cast_model
    from ..infer.server import create_app, serve
    from ..tokenizer import load_tokenizer

    _check(args)
    mode = tp_mode(args)
    if mode == "launch":
        from ..infer.ranks import launch

        check_before_launch(args, read_config(args))
        _template(args)
        return launch(args._argv, args.tensor_parallel)
    if mode == "rank":
        return run_rank(args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    template = _template(args)
    if args.checkpoint:
        from ..model import MiniMaxForCausalLM

        if not Path(args.checkpoint).is_dir():
            raise CLIError(f"no checkpoint folder at {args.checkpoint}")
        if _is_vl(args.checkpoint):  # MiniMax-VL-01: the engine serves images too
            from ..vision.model import MiniMaxVLForConditionalGeneration

            model = MiniMaxVLForConditionalGeneration.from_pretrained(
                args.checkpoint, dtype=args.dtype, device=device)
            _quantize(model.language_model, args.quantization)
        else:
            model = MiniMaxForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype,
                                                       device=device,
                                                       quantization=args.quantization)
        tokenizer = load_tokenizer(args.checkpoint)
        name = args.model_name or Path(args.checkpoint).resolve().name
    elif args.preset in _vl_presets():
        from ..vision import VLConfig
        from ..vision.model import MiniMaxVLForConditionalGeneration

        torch.manual_seed(args.seed)
        vcfg = VLConfig.from_preset(args.preset)
        model = cast_model(MiniMaxVLForConditionalGeneration(vcfg).eval(), device,
                           getattr(torch, args.dtype or vcfg.text_config.dtype))
        _quantize(model.language_model, args.quantization)
        tokenizer = load_tokenizer("byte")
        name = args.model_name or args.preset
    else:
        from ..config import ModelConfig
        from ..model import MiniMaxForCausalLM

        torch.manual_seed(args.seed)
        cfg = ModelConfig.from_preset(args.preset)
        dtype = getattr(torch, args.dtype or cfg.dtype)
        model = cast_model(MiniMaxForCausalLM(cfg).eval(), device, dtype)
        _quantize(model, args.quantization)
        tokenizer = load_tokenizer("byte")
        name = args.model_name or args.preset
    if tokenizer.vocab_size > model.config.vocab_size:  # (a VL config: its text model's)
        logging.getLogger(__name__).warning(
            "the tokenizer has %d ids but the model only %d", tokenizer.vocab_size,
            model.config.vocab_size)
    engine = Engine(model, tokenizer, max_context=args.max_context, num_slots=args.num_slots,
                    cuda_graphs=not args.no_cuda_graphs,
                    gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                    **scheduling_kwargs(args))
    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key,
                     chat_template=template, media=_media(args))
    serve(app, args.host, args.port, graceful_timeout=args.graceful_timeout,
          log_level=args.log_level)
    return 0


def run_rank(args) -> int:
    """One tensor-parallel rank (see the module docstring): rank 0 serves, the others follow."""
    import signal

    from ..infer.server import create_app, serve
    from ..infer.tp_engine import (agree_num_slots, finish_tensor_parallel, follow,
                                   init_tensor_parallel, rank_engine)
    from ..tokenizer import load_tokenizer
    from .tp_ranks import rank_model, setup_rank_logging

    template = _template(args)
    tp, channel, device = init_tensor_parallel(args.device, args.tp_timeout)
    setup_rank_logging(args.log_level, tp.rank)
    log = logging.getLogger(__name__)
    if tp.rank > 0:  # rank 0 decides when to stop (after draining) and tells the others
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: log.info("signal ignored: rank 0 stops this rank"))
    model = rank_model(args, tp, device)
    tokenizer = None
    if tp.rank == 0:
        tokenizer = load_tokenizer(args.checkpoint if args.checkpoint else "byte")
    cuda = device.type == "cuda"
    max_context = args.max_context or min(model.config.max_position_embeddings,
                                          32768 if cuda else 4096)
    sched = scheduling_kwargs(args)
    num_slots = agree_num_slots(model, device, args.num_slots, max_context,
                                sched["max_num_batched_tokens"], None,
                                args.gpu_memory_utilization,
                                int(sched["prefix_cache"] and args.prefix_cache_gb * 2 ** 30))
    engine = rank_engine(model, tokenizer, channel, tp.rank, max_context=max_context,
                         num_slots=num_slots, cuda_graphs=not args.no_cuda_graphs,
                         seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
                         **sched)
    if tp.rank > 0:
        try:
            follow(engine, channel)
        except Exception as e:  # noqa: BLE001 - rank 0 or a peer is gone
            print(f"error: tensor-parallel rank {tp.rank}: the group broke ({type(e).__name__}: "
                  f"{e})", file=sys.stderr, flush=True)
            os._exit(1)  # the process group cannot be torn down cleanly any more
        finish_tensor_parallel(tp)
        _exit_now(0)
    name = args.model_name or (Path(args.checkpoint).resolve().name if args.checkpoint
                               else args.preset)
    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key,
                     chat_template=template)
    engine.on_fatal = lambda message: os.kill(os.getpid(), signal.SIGTERM)
    channel.start_heartbeat(min(10.0, args.tp_timeout / 4))
    log.info("tensor parallel %d%s on %s: %d slots x %d tokens", tp.size,
             " (expert parallel)" if args.expert_parallel else "", device, engine.pool.num_slots,
             engine.max_context)
    serve(app, args.host, args.port, graceful_timeout=args.graceful_timeout,
          log_level=args.log_level)
    if engine.failed is not None:
        print(f"error: {engine.failed}", file=sys.stderr, flush=True)
        os._exit(1)
    try:
        channel.stop()
    except Exception as e:  # noqa: BLE001 - another rank is gone: nothing left to stop cleanly
        print(f"error: tensor-parallel rank 0 could not stop the other ranks ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr, flush=True)
        os._exit(1)
    finish_tensor_parallel(tp)
    _exit_now(0)
