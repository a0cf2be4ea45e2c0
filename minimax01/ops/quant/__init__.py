"""8-bit weights (int8 and fp8 e4m3, one scale per output channel) and the matmuls that use them
dequantising on the fly: a grouped form for MoE experts and a dense form for nn.Linear, each as a
Triton kernel beside a plain-PyTorch twin (docs/quantization.md)."""

from .grouped import BACKENDS, grouped_mm_q, grouped_mm_q_torch, linear_q, scaled_available, scaled_twin
from .schemes import FORMATS, dequantize, format_of, fp8_dtype, quantize, storage_dtype

__all__ = ["BACKENDS", "FORMATS", "dequantize", "format_of", "fp8_dtype", "grouped_mm_q",
           "grouped_mm_q_torch", "linear_q", "quantize", "scaled_available", "scaled_twin",
           "storage_dtype"]
