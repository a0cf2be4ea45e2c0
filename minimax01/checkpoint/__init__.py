"""HF-format safetensors checkpoints (both dialects) and training checkpoints."""

from .errors import CheckpointError
from .hf import (convert_checkpoint, describe_checkpoint, load_pretrained, save_pretrained,
                 save_state_dict)
from .reader import CheckpointReader

__all__ = ["CheckpointError", "CheckpointReader", "convert_checkpoint", "describe_checkpoint",
           "load_pretrained", "save_pretrained", "save_state_dict"]
