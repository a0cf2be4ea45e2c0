"""8-bit inference weights plugged into a built model from outside (docs/quantization.md):
`quantize_model(model, "int8" | "fp8")` swaps QuantizedExperts / QuantizedLinear in; the
checkpoint loader does the same per tensor while loading (`from_pretrained(..., quantization=)`)."""

from .apply import (DEFAULT_MODULES, MODULE_GROUPS, QuantConfig, check_supported, quantization_of,
                    quantize_model, quantize_on_meta, quantized_tensors, resolve, set_backend)
from .modules import QuantizedExperts, QuantizedLinear

__all__ = ["DEFAULT_MODULES", "MODULE_GROUPS", "QuantConfig", "QuantizedExperts", "QuantizedLinear",
           "check_supported", "quantization_of", "quantize_model", "quantize_on_meta",
           "quantized_tensors", "resolve", "set_backend"]
