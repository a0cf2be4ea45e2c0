"""A packed batch gives the same per-token losses as its documents run one by one; the chunked
lm_head + cross entropy equals the plain one, values and gradients."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.ops.loss import chunked_cross_entropy
from minimax01.tokenizer import ByteTokenizer
from minimax01.train.config_io import from_preset
from minimax01.train.data import IGNORE_INDEX, TrainData


def packed_batch(tmp_path):
    docs = ["short one", "a" * 70 + " middle sized document " + "b" * 40,
            "x" * 5, "the last document, long enough to cross a row boundary " * 3]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = from_preset("debug")
    cfg.data.source, cfg.data.eval_fraction, cfg.data.shuffle = str(path), 0.0, False
    cfg.train.batch_size, cfg.train.seq_len = 3, 96
    return TrainData(cfg, ByteTokenizer()).next_batch()


def test_packed_batch_equals_documents_one_by_one(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")  # lightning and softmax layers, block size 16
    model = MiniMaxForCausalLM(cfg).eval()
    batch = packed_batch(tmp_path)
    ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
    assert len(cu) > 6  # several documents and row boundaries inside the packed row
    with torch.no_grad():
        logits = model(ids, cu_seqlens=cu).logits
        packed = model.lm_loss(logits, labels, shift_labels=False, reduction="none")
        singles = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seg_logits = model(ids[:, a:b]).logits
            singles.append(model.lm_loss(seg_logits, labels[:, a:b], shift_labels=False,
                                         reduction="none"))
    singles = torch.cat(singles)
    valid = labels[0] != IGNORE_INDEX
    assert valid.sum() > 200
    torch.testing.assert_close(packed[valid], singles[valid], rtol=1e-5, atol=1e-5)
    # and the mean the trainer gets from the model's loss is the mean of those
    with torch.no_grad():
        out = model(ids, labels=labels, cu_seqlens=cu, shift_labels=False)
    torch.testing.assert_close(out.lm_loss, singles[valid].mean(), rtol=1e-5, atol=1e-6)


def test_packed_targets_never_cross_documents(tmp_path):
    batch = packed_batch(tmp_path)
    labels, cu = batch["labels"][0], batch["cu_seqlens"].tolist()
    ids = batch["input_ids"][0]
    tok = ByteTokenizer()
    for a, b in zip(cu[:-1], cu[1:]):
        seg = labels[a:b]
        # inside a segment each target is the next input; the last may continue into the next row
        for i in range(a, b - 1):
            assert labels[i] in (ids[i + 1], IGNORE_INDEX)
        assert not (seg == tok.bos_id).any()  # nothing predicts a document's <bos>


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_matches_full_logits(dtype):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug"))
    ids = torch.randint(0, 256, (1, 90))
    labels = torch.randint(0, 256, (1, 90))
    labels[0, ::7] = IGNORE_INDEX
    cu = torch.tensor([0, 33, 90], dtype=torch.int32)
    grads = []
    losses = []
    for chunk in (0, 16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids, labels=labels, cu_seqlens=cu, shift_labels=False, loss_chunk_size=chunk)
        out.loss.backward()
        losses.append(out.lm_loss.detach())
        grads.append([p.grad.clone() for p in (model.lm_head.weight, model.model.norm.weight,
                                               model.model.embed_tokens.weight)])
        assert (out.logits is None) == bool(chunk)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(losses[1], losses[0], **tol)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, **tol)


def test_chunked_cross_entropy_op_against_reference():
    torch.manual_seed(1)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::5] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    gh, gw = torch.autograd.grad(ref, (h, w))
    total, count = chunked_cross_entropy(h, w, t, chunk_size=8)
    assert count == 29
    (3 * total).backward()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, 3 * gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, 3 * gw, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no gradient work without autograd
        total2, _ = chunked_cross_entropy(h, w, t, chunk_size=100)
    torch.testing.assert_close(total2, total.detach())
