"""MiniMax-VL-01's model: the vision tower against transformers' CLIPVisionModel with the same
weights, feature splicing (count mismatches are errors), batch == one by one, cached decoding ==
the full forward, generate() with images, the loss."""

import pytest
import torch

from minimax01 import MiniMaxVLForConditionalGeneration, generate
from minimax01.vision import ImageProcessor, VisionConfig, VisionTower, VLConfig, expand_image_ids

CFG = VLConfig.from_preset("vl-debug")
IMG = CFG.image_token_index


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxVLForConditionalGeneration(CFG).eval()


def pixels(sizes, seed=0):
    """Random normalised tiles for images of `sizes` (H, W), as the processor would shape them."""
    g = torch.Generator().manual_seed(seed)
    proc = ImageProcessor.from_config(CFG)
    s = CFG.vision_config.image_size
    return [torch.randn(proc.anyres.num_tiles(h, w), 3, s, s, generator=g) for h, w in sizes]


def prompt(sizes, text=(5, 6, 7), seed=0):
    """Token ids with one expanded <image> run per image between some text tokens."""
    proc = ImageProcessor.from_config(CFG)
    ids = [1 + seed]
    for _ in sizes:
        ids += [IMG] + list(text)
    return expand_image_ids(ids, sizes, proc, IMG)


def test_tower_matches_transformers_clip():
    tf = pytest.importorskip("transformers")
    vc = VisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4)
    torch.manual_seed(1)
    ours = VisionTower(vc).double().eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref_cfg = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, image_size=56, patch_size=14,
                                  hidden_act="gelu", layer_norm_eps=1e-5,
                                  attn_implementation="eager")
    ref = tf.CLIPVisionModel(ref_cfg).double().eval()
    # transformers 5 names its tensors without the vision_model. prefix (it maps them on load)
    state = {k.removeprefix("vision_model."): v for k, v in ours.state_dict().items()}
    if any(k.startswith("vision_model.") for k in ref.state_dict()):
        state = ours.state_dict()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("post_layernorm" in k or "position_ids" in k for k in missing)
    x = torch.randn(5, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 1:]  # no post-LN, CLS dropped
        got = ours(x)
    assert got.shape == (5, 16, 32)
    # (transformers' eager attention takes its softmax in fp32: 1e-8 apart in fp64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(x, tile_batch=2), got, rtol=0, atol=1e-12)


def test_tower_uses_exact_gelu_not_quick_gelu():
    tf = pytest.importorskip("transformers")
    vc = VisionConfig(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2)
    ours = VisionTower(vc).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ref = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14, hidden_act="quick_gelu")).double().eval()
    ref.load_state_dict({k.removeprefix("vision_model."): v for k, v in ours.state_dict().items()}
                        | ours.state_dict(), strict=False)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64) * 5
    with torch.no_grad():
        assert (ours(x) - ref(pixel_values=x).last_hidden_state[:, 1:]).abs().max() > 1e-2


def test_parameter_counts(model):
    parts = CFG.num_parameters()
    assert parts["vision_tower"] == sum(p.numel() for p in model.vision_tower.parameters())
    assert parts["multi_modal_projector"] == sum(
        p.numel() for p in model.multi_modal_projector.parameters())
    assert parts["language_model"] == sum(p.numel() for p in model.language_model.parameters())
    full = VLConfig.from_preset("minimax-vl-01").num_parameters()
    assert 303e6 < full["vision_tower"] < 304e6 and 44e6 < full["multi_modal_projector"] < 44.1e6


def test_features_are_spliced_at_image_tokens(model):
    sizes = [(30, 100), (56, 56)]
    px = pixels(sizes)
    ids = torch.tensor([prompt(sizes)])
    with torch.no_grad():
        h = model.embed(ids, px, sizes)
        feats = torch.cat(model.image_features(px, sizes))
        assert torch.equal(h[ids == IMG], feats)
        text = ids != IMG
        assert torch.equal(h[text], model.language_model.model.embed_tokens(ids[text]))
    # the first image's tokens come from its own tiles: changing image 1 leaves them alone
    px2 = [px[0], torch.randn_like(px[1])]
    with torch.no_grad():
        h2 = model.embed(ids, px2, sizes)
    n0 = CFG and ImageProcessor.from_config(CFG).num_image_tokens(*sizes[0])
    where = (ids[0] == IMG).nonzero()[:, 0]
    assert torch.equal(h2[0, where[:n0]], h[0, where[:n0]])
    assert not torch.equal(h2[0, where[n0:]], h[0, where[n0:]])


def test_count_mismatch_is_a_clear_error(model):
    sizes = [(30, 100)]
    ids = prompt(sizes)
    with pytest.raises(ValueError, match=r"hold \d+ image token\(s\).*give \d+ feature"):
        model(torch.tensor([ids[:-5] + ids[-4:]]), pixel_values=pixels(sizes), image_sizes=sizes)
    with pytest.raises(ValueError, match="hold .* image token"):
        model(torch.tensor([ids]))  # image tokens, no images
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(torch.tensor([ids]), pixel_values=[torch.zeros(2, 3, 56, 56)], image_sizes=sizes)
    with pytest.raises(ValueError, match="2 pixel_values tensors but 1 image_sizes"):
        model(torch.tensor([ids]), pixel_values=pixels(sizes * 2), image_sizes=sizes)


def test_logits_and_loss(model):
    sizes = [(40, 90)]
    ids = torch.tensor([prompt(sizes)])
    labels = ids.masked_fill(ids == IMG, -100)
    out = model(ids, pixel_values=pixels(sizes), image_sizes=sizes, labels=labels)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (1, ids.shape[1], 512)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref)
    out.loss.backward()
    assert model.vision_tower.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.image_newline.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_batch_equals_one_by_one(model):
    """Two prompts with different numbers and sizes of images, left-padded in one batch."""
    a_sizes, b_sizes = [(30, 100), (120, 40)], [(56, 56)]
    a, b = prompt(a_sizes, seed=0), prompt(b_sizes, (9, 8), seed=3)
    pa, pb = pixels(a_sizes, 1), pixels(b_sizes, 2)
    width = max(len(a), len(b))
    pad = CFG.text_config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(a)) + a, [pad] * (width - len(b)) + b])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(a)], [width - len(b)]])).long()
    with torch.no_grad():
        both = model(ids, pixel_values=pa + pb, image_sizes=a_sizes + b_sizes,
                     attention_mask=mask).logits
        one_a = model(torch.tensor([a]), pixel_values=pa, image_sizes=a_sizes).logits
        one_b = model(torch.tensor([b]), pixel_values=pb, image_sizes=b_sizes).logits
    torch.testing.assert_close(both[0, width - len(a):], one_a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1, width - len(b):], one_b[0], rtol=1e-4, atol=1e-4)
    # generate(): the batch gives each prompt's own continuation
    kw = dict(max_new_tokens=4, pad_token_id=pad)
    together = generate(model, [a, b], pixel_values=pa + pb, image_sizes=a_sizes + b_sizes, **kw)
    alone_a = generate(model, [a], pixel_values=pa, image_sizes=a_sizes, **kw)
    alone_b = generate(model, [b], pixel_values=pb, image_sizes=b_sizes, **kw)
    assert torch.equal(together[0, -4:], alone_a[0, -4:])
    assert torch.equal(together[1, -4:], alone_b[0, -4:])


def test_cached_decoding_equals_full_forward(model):
    sizes = [(100, 30), (56, 112)]
    ids = prompt(sizes)
    px = pixels(sizes, 4)
    out = generate(model, [ids], max_new_tokens=5, pixel_values=px, image_sizes=sizes)
    full = torch.tensor(out[0].tolist())[None]
    with torch.no_grad():
        logits = model(full, pixel_values=px, image_sizes=sizes).logits
    # greedy: each generated token is the full forward's argmax at the position before it
    n = len(ids)
    assert torch.equal(logits[0, n - 1:-1].argmax(-1), full[0, n:])
    # a chunked prefill (images spliced once, fed in pieces) gives the same tokens
    chunked = generate(model, [ids], max_new_tokens=5, pixel_values=px, image_sizes=sizes,
                       prefill_chunk=37)
    assert torch.equal(chunked, out)


def test_text_only_model_refuses_pixels():
    from minimax01 import MiniMaxForCausalLM

    lm = MiniMaxForCausalLM(CFG.text_config)
    with pytest.raises(ValueError, match="takes no images"):
        generate(lm, [[1, 2]], max_new_tokens=1, pixel_values=[torch.zeros(2, 3, 56, 56)])
