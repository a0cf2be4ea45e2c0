"""MiniMax-VL-01 vision throughput (docs/vision.md): images/s through a full-size vision tower
(ViT-L/14 @ 336, 303M parameters) in bf16, and the prefill time of a 10-image prompt on the `1b`
backbone with a full-size tower. Correctness first: the bf16 tower against fp32 and, where
transformers is installed, against its CLIPVisionModel with the same weights; the cached prefill
against the full forward. Random weights (the numbers do not depend on them).

    python benchmarks/vision.py            # one GPU, < 3 min; writes $OUT/vision.json if set
    python benchmarks/vision.py --tiny     # CPU smoke run of the same code with tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minimax01 import MiniMaxVLForConditionalGeneration
from minimax01.config import ModelConfig
from minimax01.model.cache import HybridCache
from minimax01.vision import ImageProcessor, VisionConfig, VisionTower, VLConfig, expand_image_ids

# ten images of everyday sizes, (height, width)
PROMPT_IMAGES = [(480, 640), (1080, 1920), (768, 1024), (336, 336), (2000, 1000), (720, 1280),
                 (600, 800), (1200, 1600), (512, 512), (900, 1600)]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats):
    fn()  # warm-up
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def configs(tiny: bool):
    if tiny:
        vision = VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)
        text = ModelConfig.from_preset("debug", dtype="bfloat16")
        return VLConfig(text_config=text, vision_config=vision, image_token_index=259)
    text = ModelConfig.from_preset("1b")
    return VLConfig(text_config=text, vision_config=VisionConfig(), image_token_index=32000)


def check_tower(cfg: VLConfig, dev, results):
    torch.manual_seed(0)
    tower = VisionTower(cfg.vision_config).to(dev).eval()
    s = cfg.vision_config.image_size
    x = torch.randn(4, 3, s, s, device=dev)
    with torch.inference_mode():
        ref = tower(x)
        low = tower.to(torch.bfloat16)(x).float()
    cos = torch.nn.functional.cosine_similarity(low.flatten(), ref.flatten(), dim=0).item()
    rel = ((low - ref).norm() / ref.norm()).item()
    print(f"check: bf16 tower vs fp32: cosine {cos:.6f}, relative error {rel:.2e}")
    assert cos > 0.999 and rel < 0.05, "bf16 tower disagrees with fp32"
    results["check_bf16_cosine"] = cos
    try:
        import transformers as tf
    except ImportError:
        print("check: transformers not installed; CLIPVisionModel comparison skipped")
        return
    v = cfg.vision_config
    ref_model = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu",
        layer_norm_eps=v.layer_norm_eps)).to(dev).eval()
    tower = tower.float()
    state = {k.removeprefix("vision_model."): t for k, t in tower.state_dict().items()}
    if any(k.startswith("vision_model.") for k in ref_model.state_dict()):
        state = tower.state_dict()
    missing, unexpected = ref_model.load_state_dict(state, strict=False)
    assert not unexpected and all("post_layernorm" in k or "position_ids" in k for k in missing)
    with torch.inference_mode():
        want = ref_model(pixel_values=x).last_hidden_state[:, 1:]
        err = (tower(x) - want).abs().max().item()
    print(f"check: vs transformers CLIPVisionModel (fp32, same weights): max |diff| {err:.2e}")
    assert err < 1e-3, "the tower disagrees with transformers' CLIPVisionModel"
    results["check_vs_transformers_max_abs"] = err


def bench_tower(cfg: VLConfig, dev, results, repeats):
    tower = VisionTower(cfg.vision_config).to(dev, torch.bfloat16).eval()
    s = cfg.vision_config.image_size
    print("\nvision tower throughput (bf16, full-size)" if s == 336 else "\ntower (tiny)")
    print("tiles per call | ms per call | tiles/s | 1920x1080 images/s (19 tiles each)")
    rows = []
    for tiles in (19, 76, 190):
        x = torch.randn(tiles, 3, s, s, device=dev, dtype=torch.bfloat16)
        with torch.inference_mode():
            t = timed(lambda: tower(x), dev, repeats)
        rows.append({"tiles": tiles, "seconds": t, "tiles_per_s": tiles / t,
                     "images_1080p_per_s": tiles / t / 19})
        print(f"{tiles} | {t * 1e3:.1f} | {tiles / t:.0f} | {tiles / t / 19:.1f}")
    results["tower"] = rows


def bench_prefill(cfg: VLConfig, dev, results, repeats):
    torch.manual_seed(0)
    with torch.device(dev):
        model = MiniMaxVLForConditionalGeneration(cfg)
    model = model.to(torch.bfloat16).eval()
    proc = ImageProcessor.from_config(cfg)
    s = cfg.vision_config.image_size
    sizes = PROMPT_IMAGES if s == 336 else [(h // 6 + 1, w // 6 + 1) for h, w in PROMPT_IMAGES]
    text = list(range(10, 40))
    ids = [1] + sum(([cfg.image_token_index] + text for _ in sizes), [])
    ids = torch.tensor([expand_image_ids(ids, sizes, proc, cfg.image_token_index)], device=dev)
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(proc.anyres.num_tiles(h, w), 3, s, s, generator=g).to(dev, torch.bfloat16)
              for h, w in sizes]
    tiles = sum(p.shape[0] for p in pixels)
    n = ids.shape[1]

    def prefill():
        cache = HybridCache(cfg.text_config, 1, n + 1, device=dev, dtype=torch.bfloat16)
        return model(ids, pixel_values=pixels, image_sizes=sizes, cache=cache, logits_to_keep=1)

    with torch.inference_mode():
        # correctness: the cached prefill's last logits == the full forward's
        cached = prefill().logits[0, -1]
        full = model(ids, pixel_values=pixels, image_sizes=sizes, logits_to_keep=1).logits[0, -1]
        rel = ((cached - full).norm() / full.norm()).item()
        print(f"\ncheck: cached prefill vs full forward, last logits: relative diff {rel:.2e}")
        assert rel < 0.02, "cached prefill disagrees with the full forward"
        vision = timed(lambda: model.image_features(pixels, sizes), dev, repeats)
        total = timed(prefill, dev, repeats)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    print(f"10-image prompt on the 1b backbone ({n} tokens, {tiles} ViT tiles)")
    print(f"vision tower + projector: {vision * 1e3:.1f} ms; whole prefill: {total * 1e3:.1f} ms "
          f"({n / total:.0f} tokens/s); peak memory {mem:.1f} GiB")
    results["prefill"] = {"tokens": n, "tiles": tiles, "vision_seconds": vision,
                          "prefill_seconds": total, "tokens_per_s": n / total,
                          "peak_gib": mem, "check_rel_diff": rel}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda" and not args.tiny:
        raise SystemExit("benchmarks/vision.py: no CUDA device; use --tiny for a CPU smoke run")
    cfg = configs(args.tiny)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "tiny": args.tiny}
    check_tower(cfg, dev, results)
    bench_tower(cfg, dev, results, args.repeats)
    bench_prefill(cfg, dev, results, args.repeats)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "vision.json"), "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
