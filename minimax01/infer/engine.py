"""The serving engine: continuous batching over a fixed pool of cache slots.

Each `step()`:
  1. the scheduler frees finished slots, gives waiting requests free slots (each starting from
     its longest cached prefix, infer/prefix_cache.py) and picks the work under the token
     budget (infer/scheduler.py);
  2. every sequence past its prompt decodes one token in one batched forward (a captured CUDA
     graph per padded batch size on GPU);
  3. up to `max_num_batched_tokens` prompt tokens of any number of requests run in one packed
     varlen forward (each document continues from its slot's state, so long prompts go in
     chunks); on GPU it runs on a second stream, overlapping the memory-bound decode (paper §3.3);
  4. chunks that ended at a cache-block boundary are snapshotted into the prefix cache;
  5. one sampling call covers the decoded rows and the prompts that just finished.
Greedy output equals `generate()` token for token, with or without the prefix cache
(tests/test_engine.py, tests/test_prefix_cache.py). Steps 2-4 are driven by the step's
`StepRecord` (plain lists, `run_step`): under tensor parallelism rank 0 hands it to
`step_broadcast` first and the other ranks run the same record (infer/tp_engine.py), prefix
cache operations included. A MiniMax-VL-01
model is served as its language model plus a vision hook (infer/vision_inputs.py): a request's
images are encoded once when it gets its slot and their features replace the `<image>` tokens'
embeddings in the packed prefill (tests/test_vl_serving.py); requests with images bypass the
prefix cache (its blocks are keyed on token ids, and every image's tokens are the same id)."""

from __future__ import annotations

import contextlib
import logging
import operator
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from ..dtypes import dtype_name
from ..ops.lightning import check_slot_idx
from .detok import TextStream
from .fused_decode import fused, fused_decode_supported
from .fused_prefill import fused_prefill as fused_prefill_step
from .h2d import to_device
from .planner import plan_memory, plan_paged
from .prefix_cache import DEFAULT_BLOCK_SIZE, DEFAULT_PREFIX_CACHE_GIB, PrefixCache, PrefixStore
from .prepare import cast_model, prepare_for_serving  # noqa: F401  (cast_model: its old home)
from .request import Completion, RequestError, SamplingParams, StepOutput
from .sampling import BROKEN, sample_rows, token_logprobs
from .scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS, Scheduler, Sequence
from .slot_cache import SlotCache, SlotPool, check_servable
from .step_record import StepRecord, fold_decodes

log = logging.getLogger(__name__)
LONG_PROMPT = 65536  # log the prefill progress of prompts this long, every this many tokens


class Engine:
    """`Engine(model, tokenizer)`; `add_request(prompt_ids, params)`, `step()` until
    `has_work()` is False, or `generate(prompts, params)` for a whole batch offline.

    max_context: tokens per sequence (prompt + output). num_slots: concurrent sequences; None sizes
    the pool from free GPU memory (planner) or uses 8 on CPU. max_num_batched_tokens: prompt
    tokens per step (the token budget; `prefill_chunk` is its old name).
    prefix_cache: resume requests from cached prefixes (default on), in blocks of
    `prefix_block_size` tokens, within `prefix_cache_gb` GiB. cuda_graphs / overlap /
    fused_decode (small-batch decode kernels, infer/fused_decode.py): on by default on CUDA for
    models that have the path (its GPU check compares both steps with a float32 reference: the
    fused step is as close to it as the unfused one, benchmarks/check_decode_gpu.py).
    fused_prefill: the prefill forward's RMSNorms (and the lightning output gate) one Triton
    launch each (infer/fused_prefill.py); None: on CUDA in one process.
    fold_decodes: on steps that carry a prefill chunk, run the decode rows inside the packed
    prefill forward (each a one-token document, infer/step_record.py fold_decodes) instead of
    the decode graph + a separate forward; off by default (an experiment: GPU numbers decide).
    kv_page_size: keep the softmax K/V in pages of this many tokens (`kv_pages` of them; on GPU
    planned from free memory), so sequences take memory for their actual length; None: a
    max_context slot each.

    The engine prepares `model` in place with `prepare_for_serving` (infer/prepare.py: eval mode;
    on CUDA the sync-free MoE pipeline); `close()` gives it back as it was. `model` may be a
    MiniMaxVLForConditionalGeneration: requests may then carry images (`add_request(...,
    images=[PIL images])`, with the prompt's `<image>` tokens already expanded)."""

    def __init__(self, model, tokenizer=None, *, max_context: int | None = None,
                 num_slots: int | None = None, prefill_chunk: int | None = None,
                 max_batch: int | None = None, cuda_graphs: bool | None = None,
                 overlap: bool | None = None, gpu_memory_utilization: float = 0.9,
                 seed: int = 0, step_broadcast: Callable[[StepRecord], None] | None = None,
                 max_num_batched_tokens: int | None = None, prefix_cache: bool = True,
                 prefix_block_size: int = DEFAULT_BLOCK_SIZE,
                 prefix_cache_gb: float = DEFAULT_PREFIX_CACHE_GIB,
                 fused_decode: bool | None = None, kv_page_size: int | None = None,
                 kv_pages: int | None = None, fused_prefill: bool | None = None,
                 fold_decodes: bool = False):
        self.vision = None
        if hasattr(model, "language_model") and hasattr(model, "image_features"):  # VL-01
            if step_broadcast is not None:
                raise ValueError("images under tensor parallelism are not supported yet")
            from .vision_inputs import VisionServing

            self.vision = VisionServing(model)
            model = model.language_model
        check_servable(model.config)  # before the model is touched
        self._restore_model = prepare_for_serving(model)
        self.step_broadcast = step_broadcast  # tensor parallel: send each step to the other ranks
        self.fold_decodes = fold_decodes
        self.model = model
        self.config = cfg = model.config
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cuda = self.device.type == "cuda"
        max_context = max_context or min(cfg.max_position_embeddings, 32768 if cuda else 4096)
        budget = max_num_batched_tokens or prefill_chunk or DEFAULT_MAX_NUM_BATCHED_TOKENS
        if not prefix_cache_gb >= 0:
            raise ValueError(f"prefix_cache_gb must be >= 0, got {prefix_cache_gb}")
        cache_bytes = int(prefix_cache_gb * 2 ** 30) if prefix_cache else 0
        if num_slots is None:
            num_slots, kv_pages = self._plan(max_context, budget, max_batch, kv_page_size,
                                             kv_pages, cache_bytes, gpu_memory_utilization)
        self.max_context = max_context
        self.pool = SlotPool(cfg, num_slots, max_context, self.device, self.dtype,
                             page_size=kv_page_size, num_pages=kv_pages)
        if fused_decode is None:
            fused_decode = cuda and fused_decode_supported(cfg)
        if fused_decode and not fused_decode_supported(cfg):
            raise ValueError("fused_decode: this model (or its parallel layout) has no fused "
                             "decode path (infer/fused_decode.py fused_decode_supported)")
        if fused_prefill is None:  # the prefill forward's norms fused: on CUDA, one process
            fused_prefill = cuda and step_broadcast is None
        self.cache = SlotCache(self.pool, wrap_decode=fused if fused_decode else None,
                               wrap_prefill=fused_prefill_step if fused_prefill else None)
        self.prefix_cache = self.prefix_store = None
        if prefix_cache:
            self.prefix_cache = PrefixCache(self.pool, prefix_block_size, cache_bytes)
            self.prefix_store = PrefixStore(self.pool, prefix_block_size)
        self.scheduler = Scheduler(self.pool, budget, max_batch, self.prefix_cache)
        self.eos_id = getattr(tokenizer, "eos_id", None) if tokenizer else cfg.eos_token_id
        self.shared_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.graphs = None
        if cuda and (cuda_graphs is None or cuda_graphs):
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.cache, self.scheduler.max_batch)
        self.prefill_stream = torch.cuda.Stream(self.device) if cuda and overlap is not False else None
        log.info("engine: %d slots x %d tokens, cache %.2f GiB, max_num_batched_tokens %d, "
                 "prefix cache %s, cuda graphs %s", num_slots, max_context,
                 self.pool.memory_bytes() / 2 ** 30, budget,
                 f"{prefix_cache_gb:g} GiB in blocks of {prefix_block_size}" if prefix_cache
                 else "off", self.graphs is not None)

    def _plan(self, max_context, budget, max_batch, page_size, pages, cache_bytes,
              utilization) -> tuple[int, int | None]:
        """(slots, K/V pages) from free GPU memory (infer/planner.py); 8 slots on the CPU."""
        if self.device.type != "cuda":
            return 8, pages
        free, _ = torch.cuda.mem_get_info(self.device)
        kw = dict(dtype=dtype_name(self.dtype), prefill_chunk=budget, utilization=utilization)
        if page_size is not None:
            plan = plan_paged(self.config, free - cache_bytes / utilization, max_context,
                              page_size=page_size, max_seqs=max_batch or 256, **kw)
            log.info("paged memory plan: %d sequences, %d pages of %d tokens (%d K/V tokens)",
                     plan.num_seqs, plan.num_pages, page_size, plan.token_capacity)
            return plan.num_seqs, pages or plan.num_pages
        plan = plan_memory(self.config, free, max_context, max_slots=max_batch or 256,
                           prefix_cache_bytes=cache_bytes, **kw)
        log.info("memory plan:\n%s", plan.table())
        return plan.num_slots, pages

    def close(self) -> None:
        """Give the model back as it was before the engine prepared it (mode, MoE pipelines)
        and drop the captured graphs; the engine is not usable afterwards."""
        self.graphs = None
        self._restore_model()
        if self.vision is not None:
            self.vision.restore()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, images=None) -> str:
        """Queue a request; returns its id. ValueError for an empty prompt, ids outside the
        vocabulary, or prompt + max_tokens longer than max_context. `images`: PIL images (VL
        models), whose `<image>` tokens the prompt holds already expanded."""
        seq = self.make_sequence(prompt_ids, params, request_id, images)
        self.scheduler.add(seq)
        return seq.request_id

    def make_sequence(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                      request_id: str | None = None, images=None,
                      image_digests: Seq[str] | None = None) -> Sequence:
        """Validate a request and build its Sequence without queueing it (thread-safe: touches
        no engine state, so a server thread can reject bad requests before the engine sees
        them). Queue it with `scheduler.add` on the engine's thread. Raises RequestError (a
        ValueError) with `code` and `param`: "context_length_exceeded" when prompt + max_tokens
        pass max_context, "invalid_value" otherwise. `images` are preprocessed here (VL models;
        "invalid_image" for one the processor refuses)."""
        params = (params or SamplingParams()).validate(self.config.vocab_size)
        vocab = self.config.vocab_size
        try:
            if isinstance(prompt_ids, (str, bytes)) or any(isinstance(t, bool) for t in prompt_ids):
                raise TypeError
            prompt = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise RequestError("prompt: must be a list of integer token ids",
                               param="prompt") from None
        if not prompt:
            raise RequestError("prompt: the prompt is empty: it needs at least one token",
                               param="prompt")
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt: token id {bad!r} is outside the vocabulary "
                               f"[0, {vocab})", param="prompt")
        limit = self.pool.max_sequence_tokens
        room = limit - len(prompt)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            want = params.max_tokens or 1
            raise RequestError(f"prompt of {len(prompt)} tokens + max_tokens {want} exceeds the "
                               f"context limit of {limit} tokens",
                               "context_length_exceeded", "prompt" if room < 1 else "max_tokens")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop: stop strings need a tokenizer", param="stop")
        stops = set(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stops.add(self.eos_id)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        if images and self.vision is None:
            raise RequestError("images: this model does not take images", "unsupported_value",
                               "images")
        inputs = self.vision.prepare(prompt, images, image_digests) if self.vision else None
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        stream = TextStream(self.tokenizer, params.stop) if self.tokenizer else None
        return Sequence(rid, prompt, params, frozenset(stops), params.max_tokens or room, gen,
                        stream, images=inputs)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its slot is freed at the next step. False if unknown or finished."""
        return self.scheduler.abort(request_id) is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = [self._final(s) for s in self.scheduler.reap()]  # aborted since the last step
        plan = self.scheduler.schedule()
        extras = None
        if self.vision is not None:
            outputs += self._encode_images(plan.admitted)
            plan.prefill = [c for c in plan.prefill if not c[0].finished]
            extras = self.vision.prefill_extras(plan.prefill)
        record, done = self.step_record(plan, [s.slot for s in plan.admitted])
        record.page_tables = self.pool.take_page_updates()
        if self.prefix_cache is not None:
            bs = self.prefix_cache.block_size
            for seq, start, n in plan.prefill:  # snapshot chunks that end on a block boundary
                if (start + n) % bs == 0 and seq.images is None:
                    self.prefix_cache.save(seq.tokens(0, start + n), start + n, seq.slot)
            record.cache_loads, record.cache_saves = self.prefix_cache.take_ops()
        if self.step_broadcast is not None:  # the other ranks run the same record
            self.step_broadcast(record)
        logits = self.run_step(record, extras)
        rows = plan.decode + done
        for seq, _, n in plan.prefill:
            seq.num_cached += n
            if seq.prefill_target >= LONG_PROMPT and seq.num_cached % LONG_PROMPT < n:
                log.info("%s: prefilled %d / %d prompt tokens", seq.request_id, seq.num_cached,
                         seq.prefill_target)
        for seq in plan.decode:
            seq.num_cached += 1
        if rows:
            outputs += self._sample(rows, logits)
        return outputs

    @staticmethod
    def step_record(plan, admitted: list[int]) -> tuple[StepRecord, list[Sequence]]:
        """What the forwards of a scheduled step need, as plain lists (infer/step_record.py),
        and the sequences whose prompt this step finishes."""
        r = StepRecord(reset=list(admitted))
        for s in plan.decode:
            r.decode_tokens.append(s.output_ids[-1])
            r.decode_slots.append(s.slot)
            r.decode_lengths.append(s.num_cached)
        done = []
        for seq, start, n in plan.prefill:
            r.prefill_ids += seq.tokens(start, start + n)
            r.prefill_slots.append(seq.slot)
            r.prefill_starts.append(start)
            r.prefill_lengths.append(n)
            if start + n == seq.prefill_target:
                r.prefill_keep.append(len(r.prefill_ids) - 1)
                done.append(seq)
        return r, done

    def _encode_images(self, admitted: list[Sequence]) -> list[StepOutput]:
        """Vision features of the requests that just got a slot; one that fails ends alone."""
        failed = []
        for seq in admitted:
            if seq.images is None or seq.finished:
                continue
            try:
                self.vision.encode(seq.images)
            except Exception as e:  # e.g. out of memory on a huge image
                log.exception("%s: encoding its images failed", seq.request_id)
                seq.images = None
                failed.append(self._fail(seq, f"encoding the images failed: "
                                              f"{type(e).__name__}: {e}", "generation_failed"))
        return failed

    @torch.inference_mode()
    def run_step(self, record: StepRecord, extras=None) -> torch.Tensor | None:
        """The forwards of one step: the decode rows, then the packed prefill. Returns the
        logits of the decode rows and of the finished prompts, in that order (None: no work).
        Under tensor parallelism every rank runs this with the same record (prefix cache
        operations included: loads before the forwards, saves after). `extras`: the prefill's
        image features (infer/vision_inputs.py PrefillExtras), or None."""
        if record.page_tables:
            self.pool.apply_page_updates(record.page_tables)
        if record.cache_loads:
            self.prefix_store.apply_before(record.cache_loads)
        if self.fold_decodes and record.prefill_slots and extras is None:
            record = fold_decodes(record)  # decode rows as one-token prefill documents
        logits = []
        if record.prefill_slots and self.prefill_stream is not None:  # waits for earlier work
            self.prefill_stream.wait_stream(torch.cuda.current_stream(self.device))
        if record.decode_slots:
            logits.append(self._decode(record))
        if record.prefill_slots:
            logits.append(self._prefill(record, extras))
        if record.cache_saves:
            self.prefix_store.apply_after(record.cache_saves)
        return torch.cat(logits, 0) if logits else None

    def _decode(self, record: StepRecord) -> torch.Tensor:
        tokens = to_device(record.decode_tokens, self.device, torch.long)  # no stream sync
        slots = record.decode_slots
        check_slot_idx(slots, self.cache.pool.scratch)  # host-side: the kernels never read back
        if self.graphs is not None:
            try:
                return self.graphs.run(tokens, slots)
            except RuntimeError as e:  # capture failed: keep serving without graphs
                log.warning("CUDA graph decode failed (%s); decoding eagerly from now on", e)
                self.graphs = None
        slot_idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        active = torch.ones(len(slots), dtype=torch.bool, device=self.device)
        step = self.cache.begin_decode(slot_idx, active, record.decode_lengths)
        return self.model(tokens[:, None], cache=step).logits[:, -1]

    def _prefill(self, record: StepRecord, extras=None) -> torch.Tensor:
        stream = self.prefill_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            step = self.cache.begin_prefill(record.prefill_slots, record.prefill_starts,
                                            record.prefill_lengths, tokens=record.prefill_ids,
                                            keep=record.prefill_keep)  # one H2D copy
            input_ids, keep = step.input_ids, step.keep
            more = {}
            if extras is not None:  # images: their features at the <image> tokens
                more["inputs_embeds"] = self.vision.splice(self.model.model.embed_tokens,
                                                           input_ids, extras)
            logits = self.model(input_ids, cu_seqlens=step.cu_seqlens, cache=step,
                                logits_to_keep=keep, **more).logits[0]
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        return logits

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """Sample every row at once; a row that cannot be sampled (NaN/inf logits, or a failure
        of its own) ends that request with an error and the other rows carry on."""
        params = [s.params for s in rows]
        try:
            tokens = sample_rows(logits, params, [s.generator for s in rows], self.shared_gen)
        except Exception:  # find the row at fault: sample one by one
            log.exception("batched sampling failed; sampling row by row")
            tokens = torch.stack([self._sample_one(logits[i:i + 1], seq)
                                  for i, seq in enumerate(rows)])
        token_list = tokens.tolist()
        lps = token_logprobs(logits, tokens, [p.logprobs for p in params], token_list)
        outputs = []
        for seq, token, lp in zip(rows, token_list, lps):
            if seq.finished:  # aborted during this step
                continue
            if token == BROKEN:
                outputs.append(self._fail(seq, "the model produced NaN or inf logits",
                                          "nonfinite_logits"))
                continue
            try:
                outputs.append(self._append(seq, token, lp))
            except Exception as e:  # e.g. the tokenizer failed on this sequence
                log.exception("%s: failed after sampling", seq.request_id)
                outputs.append(self._fail(seq, f"{type(e).__name__}: {e}", "generation_failed"))
        return outputs

    def _sample_one(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        try:
            return sample_rows(logits, [seq.params], [seq.generator], self.shared_gen)[0]
        except Exception:
            log.exception("%s: sampling failed", seq.request_id)
            return torch.tensor(BROKEN, device=logits.device)

    def _fail(self, seq: Sequence, message: str, code: str) -> StepOutput:
        """End one request with an error; its slot is freed at the next step."""
        seq.finish_reason = "error"
        return StepOutput(seq.request_id, [], "", None, True, "error", len(seq.prompt_ids),
                          self._returned(seq), error=message, error_code=code,
                          cached_tokens=seq.cached_tokens or 0)

    @staticmethod
    def _returned(seq: Sequence) -> int:
        return seq.stream.returned_tokens if seq.stream is not None else len(seq.output_ids)

    def _append(self, seq: Sequence, token: int, lp) -> StepOutput:
        text = ""
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
            new_ids, lps = [], []
        else:
            seq.output_ids.append(token)
            new_ids, lps = [token], ([lp] if lp is not None else [])
            if seq.stream is not None:
                text = seq.stream.push(token)
                if lp is not None:
                    lp.text_offset = seq.stream.starts[-1]
                if seq.stream.stopped:
                    seq.finish_reason = "stop"
            if lp is not None:
                seq.logprobs.append(lp)
            if not seq.finished and (len(seq.output_ids) >= seq.max_tokens
                                     or seq.num_cached >= self.max_context):
                seq.finish_reason = "length"
        if seq.finished and seq.stream is not None:
            text += seq.stream.finish()
        return StepOutput(seq.request_id, new_ids, text,
                          lps if seq.params.logprobs is not None else None, seq.finished,
                          seq.finish_reason, len(seq.prompt_ids), self._returned(seq),
                          cached_tokens=seq.cached_tokens or 0)

    def _final(self, seq: Sequence) -> StepOutput:
        return StepOutput(seq.request_id, [], "", None, True, seq.finish_reason,
                          len(seq.prompt_ids), len(seq.output_ids),
                          cached_tokens=seq.cached_tokens or 0)

    # ------------------------------------------------------------------ offline batch
    def generate(self, prompts: Seq[Seq[int]] | Seq[str],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 images: Seq[Seq] | None = None) -> list[Completion]:
        """Run a batch of prompts (token lists, or strings with a tokenizer) to completion;
        `images`: one list of PIL images per prompt (VL models)."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer")
                prompt = self.tokenizer.encode(prompt)
            ids.append(self.add_request(prompt, p, images=images[len(ids)] if images else None))
        seqs = {s.request_id: s for s in self.scheduler.waiting if s.request_id in ids}
        errors = {}
        while any(not seqs[r].finished for r in ids):
            errors.update((o.request_id, o.error) for o in self.step() if o.error is not None)
        self.scheduler.reap()
        out = []
        for rid in ids:
            s = seqs[rid]
            text = s.stream.text if s.stream is not None else ""
            out.append(Completion(rid, s.prompt_ids, list(s.output_ids), text, s.finish_reason,
                                  list(s.logprobs) if s.params.logprobs is not None else None,
                                  errors.get(rid)))
        return out
