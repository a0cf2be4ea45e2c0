"""Serving under load, the way users drive it (issue 18): the real OpenAI-compatible HTTP server
(`create_app`, uvicorn, in this process) and streaming clients over HTTP.

    python benchmarks/serving.py                          # 1b preset on the GPU, rates 1/4/16
    python benchmarks/serving.py --tiny                   # CPU smoke run, < 60 s
    python benchmarks/serving.py --preset 1b --rates 1,4 --num-conversations 48 --json out.json

The default run (4 configurations x 3 rates x 24 conversations) should take about 5 minutes on
one H200 (not measured yet). Client and server share this process (and its GIL).

Workload (seeded, the same for every configuration): conversations start at Poisson arrivals of
`rate` per second; each is drawn from a mix -- short chat (a shared system prompt + a user
turn, 2-3 turns: each next turn resends the whole conversation, its earlier prompt a prefix),
8K-token documents (one turn), and a few very long prompts (--long-tokens, 128K by default).
Every prompt is distinct random tokens (beyond the shared prefixes), so no two sequences route
alike; outputs are fixed lengths (ignore_eos) so the work is the same in every configuration.

The same workload runs against the engine with each feature off: `all` (defaults), `no-prefix-
cache`, `no-token-budget` (max_num_batched_tokens = the old 16384-token prefill chunk), and with
paged K/V on (`paged-kv`, 16-token pages; off by default). Per
(configuration, rate): request and output-token throughput, TTFT and inter-token latency
p50/p99 (ITL: gaps between streamed tokens), the prefix-cache hit rate (usage.prompt_tokens_
details.cached_tokens over prompt tokens) and preemptions. Prints a table; --json PATH (and
$OUT/serving.json when $OUT is set) gets every number."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from minimax01 import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax01.config import hybrid_layer_types  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.prepare import cast_model  # noqa: E402
from minimax01.infer.server import create_app  # noqa: E402
from minimax01.tokenizer import load_tokenizer  # noqa: E402

OLD_PREFILL_CHUNK = 16384  # the engine's prefill chunk before the token budget (issue 18)
CONFIGS = {"all": {}, "no-prefix-cache": {"prefix_cache": False},
           "no-token-budget": {"max_num_batched_tokens": OLD_PREFILL_CHUNK},
           "paged-kv": {"kv_page_size": 16}}


@dataclass
class Mix:
    system: int = 2048            # shared system prompt of the chat conversations
    chat: tuple = (64, 1024)      # user turn tokens (uniform)
    chat_out: tuple = (64, 256)
    turns: tuple = (2, 3)
    doc: int = 8192
    doc_out: int = 128
    long: int = 131072
    long_out: int = 32
    p_doc: float = 0.25
    p_long: float = 0.03


TINY = Mix(system=24, chat=(4, 24), chat_out=(3, 8), turns=(2, 3), doc=96, doc_out=6,
           long=300, long_out=4, p_doc=0.25, p_long=0.1)


@dataclass
class Turn:
    prompt: list[int]
    max_tokens: int


@dataclass
class Conversation:
    start: float
    kind: str
    turns: list[Turn] = field(default_factory=list)


def workload(n: int, rate: float, mix: Mix, vocab: int, seed: int) -> list[Conversation]:
    """`n` conversations with Poisson arrivals; random distinct tokens, shared system prompts."""
    rng = random.Random(seed)
    toks = lambda k: [rng.randrange(1, vocab) for _ in range(k)]  # noqa: E731
    systems = [toks(mix.system) for _ in range(2)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        u = rng.random()
        if u < mix.p_long:
            conv = Conversation(t, "long", [Turn(toks(mix.long), mix.long_out)])
        elif u < mix.p_long + mix.p_doc:
            conv = Conversation(t, "doc", [Turn(toks(mix.doc), mix.doc_out)])
        else:
            conv, history = Conversation(t, "chat"), list(rng.choice(systems))
            for _ in range(rng.randint(*mix.turns)):
                history += toks(rng.randint(*mix.chat))
                n_out = rng.randint(*mix.chat_out)
                conv.turns.append(Turn(list(history), n_out))
                history += toks(n_out)  # the client's copy of the reply
        out.append(conv)
    return out


@dataclass
class Result:
    ttft: float
    itl: list[float]
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    error: str | None = None


async def one_request(client, url: str, model: str, turn: Turn) -> Result:
    body = {"model": model, "prompt": turn.prompt, "max_tokens": turn.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, last, ttft, itl, tokens, usage = time.perf_counter(), None, None, [], 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return Result(0, [], 0, len(turn.prompt), 0, f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return Result(0, [], 0, len(turn.prompt), 0, event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            if not event.get("choices"):
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - sent
            else:
                itl.append(now - last)
            last, tokens = now, tokens + 1
    cached = (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return Result(ttft or 0.0, itl, tokens, len(turn.prompt), cached)


async def drive(url: str, model: str, convs: list[Conversation]) -> tuple[list[Result], float]:
    import httpx

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def conversation(conv):
            await asyncio.sleep(max(0.0, conv.start - (time.perf_counter() - t0)))
            return [await one_request(client, url, model, turn) for turn in conv.turns]

        results = await asyncio.gather(*(conversation(c) for c in convs))
        return [r for rs in results for r in rs], time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    itl = [x for r in ok for x in r.itl]
    prompt = sum(r.prompt_tokens for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), None),
            "wall_s": wall, "req_per_s": len(ok) / wall,
            "output_tok_per_s": sum(r.tokens for r in ok) / wall,
            "ttft_p50_ms": pct([r.ttft for r in ok], 50) * 1e3,
            "ttft_p99_ms": pct([r.ttft for r in ok], 99) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
            "prompt_tokens": prompt, "cached_tokens": sum(r.cached_tokens for r in ok),
            "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0}


def run_config(model, tokenizer, name: str, engine_kw: dict, rates, args, mix) -> list[dict]:
    """Start the server with this configuration; run the workload at every rate."""
    import uvicorn

    from minimax01.infer.ranks import free_port

    rows = []
    for rate in rates:  # a fresh engine per rate: an empty prefix cache, no leftover state
        engine = Engine(model, tokenizer, **engine_kw)
        app = create_app(engine, tokenizer, model_name="bench")
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        loop_thread = __import__("threading").Thread(target=server.run, daemon=True)
        loop_thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            convs = workload(args.num_conversations, rate, mix, engine.config.vocab_size,
                             args.seed)
            results, wall = asyncio.run(drive(f"http://127.0.0.1:{port}", "bench", convs))
            row = {"config": name, "rate": rate, **summarize(results, wall),
                   "preemptions": engine.scheduler.num_preemptions}
            rows.append(row)
            print(fmt(row), flush=True)
        finally:
            server.should_exit = True
            loop_thread.join(30)
            engine.close()
    return rows


HEADER = (f"{'config':<16} {'rate/s':>6} {'req':>4} {'err':>3} {'req/s':>6} {'tok/s':>8} "
          f"{'TTFT p50':>9} {'p99':>9} {'ITL p50':>8} {'p99':>8} {'hit':>5} {'preempt':>7}")


def fmt(r: dict) -> str:
    return (f"{r['config']:<16} {r['rate']:>6g} {r['requests']:>4} {r['errors']:>3} "
            f"{r['req_per_s']:>6.2f} {r['output_tok_per_s']:>8.1f} {r['ttft_p50_ms']:>7.1f}ms "
            f"{r['ttft_p99_ms']:>7.1f}ms {r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms "
            f"{r['cache_hit_rate']:>5.2f} {r['preemptions']:>7}")


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
                       layer_types=hybrid_layer_types(4, 2), num_local_experts=4,
                       num_experts_per_tok=2, block_size=8, dtype="float32",
                       rope_theta=10_000.0)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b", help="model preset (random weights; default 1b)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload on the CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rates", default=None, help="conversations per second, comma separated")
    p.add_argument("--num-conversations", type=int, default=None)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"of {list(CONFIGS)}")
    p.add_argument("--long-tokens", type=int, default=131072)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--num-slots", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--prefix-block-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    unknown = [c for c in a.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    return a


def main(argv=None) -> int:
    args = parse(argv)
    torch.manual_seed(args.seed)
    if args.tiny:
        device, mix = torch.device(args.device or "cpu"), TINY
        model = MiniMaxForCausalLM(tiny_config()).eval()
        base = dict(max_context=args.max_context or 512, num_slots=args.num_slots or 4,
                    max_num_batched_tokens=args.max_num_batched_tokens or 32,
                    prefix_block_size=args.prefix_block_size or 16)
        rates = [float(x) for x in (args.rates or "8,32").split(",")]
        args.num_conversations = args.num_conversations or 8
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        mix = Mix(long=args.long_tokens)
        cfg = ModelConfig.from_preset(args.preset)
        model = cast_model(MiniMaxForCausalLM(cfg).eval(), device, getattr(torch, args.dtype))
        base = dict(max_context=args.max_context or args.long_tokens + 4096,
                    num_slots=args.num_slots)
        if args.max_num_batched_tokens:
            base["max_num_batched_tokens"] = args.max_num_batched_tokens
        if args.prefix_block_size:
            base["prefix_block_size"] = args.prefix_block_size
        rates = [float(x) for x in (args.rates or "1,4,16").split(",")]
        args.num_conversations = args.num_conversations or 24
    tokenizer = load_tokenizer("byte")
    print(f"serving benchmark: {'tiny' if args.tiny else args.preset} on {device}, "
          f"{args.num_conversations} conversations per rate, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(HEADER)
    if not args.tiny:  # compile the kernels and capture the graphs before anything is timed
        warm = argparse.Namespace(**{**vars(args), "num_conversations": 3})
        run_config(model, tokenizer, "(warm-up)", base, [50.0], warm, mix)
    rows = []
    for name in args.configs.split(","):
        rows += run_config(model, tokenizer, name, {**base, **CONFIGS[name]}, rates, args, mix)
    errors = sum(r["errors"] for r in rows)
    out = {"device": str(device), "preset": "tiny" if args.tiny else args.preset,
           "torch": torch.__version__, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for path in filter(None, [args.json, os.environ.get("OUT") and
                              os.path.join(os.environ["OUT"], "serving.json")]):
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    if errors:
        print(f"FAILED: {errors} requests failed (first: "
              f"{next(r['first_error'] for r in rows if r['first_error'])})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
