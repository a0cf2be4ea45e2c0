"""Images in the serving engine: what a MiniMax-VL-01 request carries, and the prefill's extra
input (VL01.md §6).

A request's images are preprocessed when it is made (`VisionServing.prepare`: the any-res
processor, off the engine thread), encoded once when it gets its cache slot
(`VisionServing.encode`: tower -> projector -> packed features, on the engine's device), and
spliced into the packed varlen prefill at the prompt's `<image>` positions
(`VisionServing.prefill_extras` + `splice`). A prompt prefilled in chunks takes, in each
chunk, exactly the features of the image tokens that chunk holds. Decoding is pure text."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .request import RequestError


@dataclass
class ImageInputs:
    """One request's images: processed tiles, (height, width) of each image, where its image
    tokens sit in the prompt (sorted), the images' content hashes, and - once encoded at
    admission - the packed features [len(positions), hidden], one row per image token."""

    pixel_values: list[torch.Tensor]
    image_sizes: list[tuple[int, int]]
    positions: list[int]
    digests: list[str] = field(default_factory=list)
    features: torch.Tensor | None = None


@dataclass
class PrefillExtras:
    """What a packed prefill needs besides token ids: the packed positions of image tokens and
    their features, in that order."""

    positions: torch.Tensor   # [M] long, into the packed prefill
    features: torch.Tensor    # [M, hidden]


class VisionServing:
    """The vision side of a MiniMaxVLForConditionalGeneration, as the engine uses it; the
    language model itself is served as any MiniMaxForCausalLM."""

    def __init__(self, vl_model, processor=None):
        from ..vision import ImageProcessor

        self.model = vl_model
        self.processor = processor or ImageProcessor.from_config(vl_model.config)
        self.image_token_id = int(vl_model.config.image_token_index)
        self._was_training = vl_model.training
        vl_model.vision_tower.eval()
        vl_model.multi_modal_projector.eval()

    def restore(self) -> None:
        self.model.vision_tower.train(self._was_training)
        self.model.multi_modal_projector.train(self._was_training)

    # ------------------------------------------------------------------ per request
    def prepare(self, prompt: list[int], images, digests=None, param: str = "images"
                ) -> ImageInputs | None:
        """Preprocess a request's images (PIL) and check them against its prompt: the prompt
        must hold exactly as many image tokens as the images give, in order. RequestError
        naming `param` otherwise. ImageInputs prepared before are checked and returned."""
        from ..vision import ImageError

        positions = [k for k, t in enumerate(prompt) if t == self.image_token_id]
        if isinstance(images, ImageInputs):  # prepared already (the server does, off its loop)
            if images.positions != positions:
                raise RequestError("prompt: its image tokens are not where the prepared images "
                                   "expect them", param="prompt")
            return images
        images = list(images or [])
        if not images and not positions:
            return None
        try:
            out = self.processor(images) if images else {"pixel_values": [], "image_sizes": []}
        except ImageError as e:
            raise RequestError(f"{param}: {e}", "invalid_image", param) from None
        sizes = [tuple(int(x) for x in s) for s in out["image_sizes"]]
        need = sum(self.processor.num_image_tokens(h, w) for h, w in sizes)
        if need != len(positions):
            raise RequestError(f"prompt: it holds {len(positions)} image token(s) (id "
                               f"{self.image_token_id}) but the {len(images)} image(s) need "
                               f"{need}: text may not contain the image token itself",
                               param="prompt")
        return ImageInputs(out["pixel_values"], sizes, positions, list(digests or []))

    @torch.inference_mode()
    def encode(self, inputs: ImageInputs) -> None:
        """Tower -> projector -> packed features of all the request's images (at admission)."""
        if inputs.features is None and inputs.pixel_values:
            feats = self.model.image_features(inputs.pixel_values, inputs.image_sizes)
            inputs.features = torch.cat(feats)

    # ------------------------------------------------------------------ per prefill
    def prefill_extras(self, chunks) -> PrefillExtras | None:
        """`chunks`: the prefill's (sequence, first prompt token, number of tokens), in packed
        order. The packed positions of the image tokens in them and the matching slices of
        each sequence's features; None when no chunk holds an image token."""
        positions, feats, offset = [], [], 0
        for seq, start, n in chunks:
            inputs = seq.images
            if inputs is not None and inputs.positions:
                lo = bisect.bisect_left(inputs.positions, start)
                hi = bisect.bisect_left(inputs.positions, start + n)
                if hi > lo:
                    positions += [offset + p - start for p in inputs.positions[lo:hi]]
                    feats.append(inputs.features[lo:hi])
            offset += n
        if not feats:
            return None
        device = feats[0].device
        return PrefillExtras(torch.tensor(positions, dtype=torch.long, device=device),
                             torch.cat(feats))

    def splice(self, embed_tokens, input_ids: torch.Tensor, extras: PrefillExtras
               ) -> torch.Tensor:
        """[1, T, hidden] embeddings of the packed prefill with the image features in place
        (the image token's own embedding is never read, as in the released model)."""
        ids = input_ids.clone()
        ids[0, extras.positions] = 0
        h = embed_tokens(ids)
        h[0, extras.positions] = extras.features.to(h.dtype)
        return h
