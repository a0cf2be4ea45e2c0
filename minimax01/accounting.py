"""Parameter, FLOP and memory accounting of a ModelConfig as plain numbers and printable tables
(what `python -m minimax01 info` shows; SPEC §8).

Numbers come from the config's own accounting (`num_parameters`, `flops_per_token`,
`kv_cache_bytes_per_token`, `lightning_state_bytes`); this module only arranges them. Context
lengths are binary: 8K = 8,192 tokens, 1M = 1,048,576; sizes are in binary units (KiB, MiB, GiB).
To add a section to `info`, write a function `ModelConfig -> Table` and append it to SECTIONS
(or print it from the command when an option asks for it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import ModelConfig

K, M = 1024, 1024 * 1024
MEMORY_CONTEXTS = (8 * K, 32 * K, 128 * K, 512 * K, 1 * M, 2 * M, 4 * M)
FLOP_CONTEXTS = (4 * K, 32 * K, 128 * K, 1 * M)
WEIGHT_FORMATS = (("bf16", 2.0), ("int8", 1.0))  # bytes per parameter, weights only


# ---------------------------------------------------------------------- formatting
def context_label(tokens: int) -> str:
    """8192 -> "8K", 1048576 -> "1M"; other counts as they are."""
    for unit, name in ((M, "M"), (K, "K")):
        if tokens >= unit and tokens % unit == 0:
            return f"{tokens // unit}{name}"
    return str(tokens)


def fmt_bytes(n: float) -> str:
    for unit, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.2f}{name}"
    return str(int(n))


def fmt_flops(n: float) -> str:
    for unit, name in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if abs(n) >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n:.0f} FLOP"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    header: bool = True

    def render(self) -> str:
        """Plain-text table: first column left-aligned, the others right-aligned (all left-aligned
        without a header: a list of key/value lines)."""
        cells = [self.columns] + self.rows
        widths = [max(len(str(r[c])) for r in cells) for c in range(len(self.columns))]
        widths[0] += 2 if not self.header else 0

        def line(row):
            return "  ".join(str(v).ljust(w) if c == 0 or not self.header else str(v).rjust(w)
                             for c, (v, w) in enumerate(zip(row, widths))).rstrip()

        out = [self.title]
        if self.header:
            out += [line(self.columns), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in self.rows]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------- numbers
def kv_cache_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Softmax layers' K and V for one sequence of `tokens` tokens."""
    return cfg.kv_cache_bytes_per_token(dtype_bytes) * tokens


def sequence_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """All generation-cache memory of one sequence: KV cache plus the fp32 lightning states (and
    the fixed window of K/V of sliding-window layers)."""
    return (kv_cache_bytes(cfg, tokens, dtype_bytes) + cfg.lightning_state_bytes()
            + cfg.sliding_cache_bytes(dtype_bytes))


# ---------------------------------------------------------------------- tables
def summary_table(cfg: ModelConfig) -> Table:
    rows = [
        ["layers", f"{cfg.num_hidden_layers} ({cfg.num_linear_layers} lightning + "
                   f"{cfg.num_full_layers} softmax"
                   + (f" + {cfg.num_sliding_layers} sliding-window softmax, window "
                      f"{cfg.sliding_window}" if cfg.num_sliding_layers else "") + ")"],
        ["hidden size", str(cfg.hidden_size)],
        ["attention", f"{cfg.num_attention_heads} heads x {cfg.head_dim} "
                      f"({cfg.num_key_value_heads} KV heads), rotary_dim {cfg.rotary_dim}"],
        ["MoE", f"{cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}, "
                f"intermediate {cfg.intermediate_size}"],
        ["vocabulary", f"{cfg.vocab_size}" + (" (tied embeddings)" if cfg.tie_word_embeddings else "")],
        ["residual", f"{'post' if cfg.postnorm else 'pre'}-norm, alpha {cfg.mlp_alpha:.6g}"],
        ["dtype", cfg.dtype],
    ]
    return Table("Model", ["", ""], rows, header=False)


def parameter_table(cfg: ModelConfig) -> Table:
    rows = []
    for label, active in (("total", False), ("active per token", True)):
        with_emb = cfg.num_parameters(active=active, embeddings=True)
        without = cfg.num_parameters(active=active, embeddings=False)
        rows.append([label, fmt_count(with_emb), fmt_count(without)])
    return Table("Parameters", ["", "with embeddings", "without embeddings"], rows,
                 ["'active' counts the top-k experts a token uses; 'embeddings' = embed_tokens + lm_head"])


def flops_table(cfg: ModelConfig, contexts=FLOP_CONTEXTS) -> Table:
    rows = [[context_label(t), fmt_flops(cfg.flops_per_token(t)),
             fmt_flops(cfg.flops_per_token(t, training=True))] for t in contexts]
    return Table("FLOPs per token (matmuls, causal attention averaged over positions)",
                 ["context", "forward", "training (3x)"], rows)


def weights_table(cfg: ModelConfig, formats=WEIGHT_FORMATS) -> Table:
    rows = [[name, fmt_bytes(cfg.weight_bytes(b))] for name, b in formats]
    return Table("Weights memory", ["format", "all parameters"], rows,
                 ["int8: one byte per weight, quantisation scales not counted"])


def memory_table(cfg: ModelConfig, contexts=MEMORY_CONTEXTS) -> Table:
    state = cfg.lightning_state_bytes()
    rows = [[context_label(t), f"{t:,}", fmt_bytes(kv_cache_bytes(cfg, t)), fmt_bytes(state),
             fmt_bytes(sequence_bytes(cfg, t))] for t in contexts]
    notes = [f"KV cache: {fmt_bytes(cfg.kv_cache_bytes_per_token(2))} per token "
             f"({cfg.num_full_layers} softmax layers); lightning state: {cfg.num_linear_layers} "
             f"layers x {fmt_bytes(state / max(cfg.num_linear_layers, 1))}, whatever the length"]
    return Table("Cache memory per sequence",
                 ["context", "tokens", "KV cache (bf16)", "lightning state (fp32)", "total"], rows,
                 notes)


SECTIONS: list[Callable[[ModelConfig], Table]] = [summary_table, parameter_table, flops_table,
                                                  weights_table, memory_table]


def report(cfg: ModelConfig) -> list[Table]:
    return [section(cfg) for section in SECTIONS]
