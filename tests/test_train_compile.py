"""train.compile (torch.compile of every decoder layer, as Trainer.build_model does) on CPU: a
tiny hybrid model's first steps under AdamW give the same losses and weights as eager. The MoE's
data-dependent shapes and the host reads of the CPU paths are graph breaks, not errors."""

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import FULL, LINEAR


def _steps(backend: str | None, steps: int = 2):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, rotary_dim=8, num_local_experts=4,
                      num_experts_per_tok=2, block_size=16, vocab_size=64, num_hidden_layers=2,
                      layer_types=[LINEAR, FULL])
    model = MiniMaxForCausalLM(cfg).float().train()
    if backend is not None:
        for layer in model.model.layers:
            layer.compile(backend=backend)  # mode=None, dynamic=None: as train.compile does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, 64), generator=g)
    cu = torch.tensor([0, 40, 64], dtype=torch.int32)
    losses = []
    for _ in range(steps):
        out = model(ids, labels=ids, cu_seqlens=cu)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor",
                                                                marks=pytest.mark.slow)])
def test_compiled_layers_train_like_eager(backend):
    """aot_eager: Dynamo's graphs and breaks and AOTAutograd's backward, in seconds; inductor
    (what train.compile runs; minutes on a busy CPU): the generated kernels too."""
    torch._dynamo.reset()
    eager_losses, eager_w = _steps(None)
    from torch._dynamo.utils import counters

    counters.clear()
    losses, w = _steps(backend)
    assert counters["stats"]["unique_graphs"] > 0  # the layers did compile
    # lightning_attn runs outside the graphs (torch.compiler.disable), not traced into pieces
    assert any("disable" in reason for reason in counters["graph_break"])
    assert torch.allclose(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    for k in eager_w:
        torch.testing.assert_close(w[k], eager_w[k], rtol=1e-4, atol=1e-5, msg=k)
