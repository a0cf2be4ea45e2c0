"""HF-format safetensors checkpoints (both dialects) and training checkpoints."""
