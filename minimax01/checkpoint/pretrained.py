"""What `MiniMaxForCausalLM.from_pretrained` / `.save_pretrained` run (through minimax01.wiring):
a 16-bit checkpoint (checkpoint/hf.py) or an 8-bit one (checkpoint/quantized.py), as the
checkpoint's config.json and the `quantization` argument say."""

from .quantized import load_any as load_pretrained  # noqa: F401
from .quantized import save_any as save_pretrained  # noqa: F401
