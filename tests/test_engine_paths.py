"""The engine's alternative decode and cache paths give the same greedy tokens as the default
ones: fused small-batch decode kernels (infer/fused_decode.py, their torch twins on the CPU)."""

import pytest
import torch

from test_prefix_cache import GREEDY, outputs, tiny_config, workload
from minimax01 import MiniMaxForCausalLM
from minimax01.infer.engine import Engine
from minimax01.infer.fused_decode import FusedDecodeStep


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(tiny_config()).eval()


def test_fused_decode_equals_unfused(model):
    prompts = workload(11, n=5)
    kw = dict(num_slots=3, max_context=256, max_num_batched_tokens=32, prefix_block_size=8)
    want = outputs(Engine(model, fused_decode=False, **kw), prompts)
    eng = Engine(model, fused_decode=True, **kw)
    slot_idx = torch.tensor([0]), torch.tensor([True])
    assert isinstance(eng.cache.begin_decode(*slot_idx, [0]), FusedDecodeStep)
    assert outputs(eng, prompts) == want
