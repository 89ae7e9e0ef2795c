"""Stage 3's fast decode path (``caption.decoder: fast``): BLIP-2's OPT decoder stepped over a
fixed-shape KV cache, greedy and beam search, the step compiled as a CUDA graph on CUDA.

Why: on an H200, ``generate`` at batch 256 spends ~14 ms per decode step where the weights and
the math allow 2-3 ms (FACTS.md): the time goes to per-step host work (Python, hundreds of small
kernel launches, a growing cache re-allocated by ``torch.cat`` every step). Here:

- the image half (vision tower, Q-Former, projection) runs once per chunk, outside the loop, and
  on CUDA for chunk k+1 on a side stream while chunk k decodes (:meth:`FastDecoder.features_ahead`);
- the prompt (image embeddings + BOS + prompt text) is prefilled once per image, even for beam
  search (``generate`` prefills every beam: 5x the prefill work at ``num_beams=5``), then copied
  into transformers' ``StaticCache`` of fixed shape ``[rows, heads, prompt + max_new_tokens, dim]``;
- every decode step has one shape (rows = images x beams, padded to the chunk size with copies of
  the last image, so the last chunk of a run does not change it) and is one function of fixed-shape
  tensors, so ``torch.compile(mode="reduce-overhead", fullgraph=True)`` records it once as a CUDA
  graph and replays it; the beam reorder of the cache is inside that step, in place;
- the loop stops as soon as every sequence has ended (one host sync per step).

What must not change is the text: the token choice is a port of transformers' own loops
(``GenerationMixin._sample`` without sampling, ``GenerationMixin._beam_search``, as of 5.24),
with the same logits processors (transformers' classes) and stopping rules, fed the same
sequences. ``tests/caption/test_caption_fast.py`` checks token-for-token equality with
``generate`` on CPU. :func:`settings_for` refuses a generation config that would add a processor
this port does not apply, rather than give different captions.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class UnsupportedDecoding(ValueError):
    """The model's generation config asks for something the fast path does not reproduce."""


# Generation-config fields that make ``generate`` add a logits processor or change the search,
# with the value that leaves it out. The fast path applies only repetition_penalty and
# min_new_tokens (the settings the stage has), so any other one set in the language model's
# generation config (what BLIP-2's generate() reads) would make its captions differ: refuse.
_INERT: dict[str, Any] = {
    "do_sample": False,
    "num_return_sequences": 1,
    "guidance_scale": None,
    "sequence_bias": None,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "stop_strings": None,
    "max_time": None,
    "constraints": None,
    "force_words_ids": None,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "watermarking_config": None,
}


@dataclass(frozen=True)
class FastSettings:
    """One decoding setting, resolved the way ``generate`` resolves it from the generation config."""

    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    repetition_penalty: float
    length_penalty: float
    early_stopping: bool | str
    eos_ids: tuple[int, ...]
    pad_id: int


def settings_for(generation_config: Any, kwargs: dict[str, Any]) -> FastSettings:
    """The settings ``generate(**kwargs)`` would use with ``generation_config`` (the language
    model's), or :class:`UnsupportedDecoding` when they need something this path lacks."""
    gc = copy.deepcopy(generation_config)
    gc.update(**kwargs)
    for name, inert in _INERT.items():
        value = getattr(gc, name, inert)
        if value is None and inert in (0, 0.0, 1, 1.0, False):
            continue  # unset counts as the default
        if value != inert:
            raise UnsupportedDecoding(f"generation setting {name}={value!r} is not supported by decoder=fast")
    if gc.min_length not in (None, 0):
        raise UnsupportedDecoding(
            f"generation setting min_length={gc.min_length!r} is not supported by decoder=fast"
        )
    if gc.max_new_tokens is None:
        raise UnsupportedDecoding("decoder=fast needs max_new_tokens")
    eos = gc.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if not eos_ids:
        raise UnsupportedDecoding("decoder=fast needs an eos_token_id in the generation config")
    # generate() falls back to the first EOS id when there is no pad token.
    pad_id = gc.pad_token_id if gc.pad_token_id is not None else eos_ids[0]
    return FastSettings(
        num_beams=int(gc.num_beams or 1),
        max_new_tokens=int(gc.max_new_tokens),
        min_new_tokens=int(gc.min_new_tokens or 0),
        repetition_penalty=float(gc.repetition_penalty if gc.repetition_penalty is not None else 1.0),
        length_penalty=float(gc.length_penalty if gc.length_penalty is not None else 1.0),
        early_stopping=gc.early_stopping if gc.early_stopping is not None else False,
        eos_ids=eos_ids,
        pad_id=int(pad_id),
    )


class Pending:
    """Image features being computed (on CUDA: on the side stream); :meth:`result` waits for them."""

    def __init__(self, features: torch.Tensor, event: Any = None) -> None:
        self._features = features
        self._event = event

    def result(self) -> torch.Tensor:
        import torch

        if self._event is not None:
            stream = torch.cuda.current_stream(self._features.device)
            stream.wait_event(self._event)
            # Allocated on the side stream, read on this one: keep the allocator from reusing it early.
            self._features.record_stream(stream)
        return self._features


class FastDecoder:
    """Greedy and beam search for a ``Blip2ForConditionalGeneration`` with an OPT-style decoder.

    ``prompt_ids`` is the stage's prompt (``[1, P]``: image placeholders, BOS, prompt text), the
    same for every image. ``compile_options`` go to ``torch.compile`` for the decode step (None:
    eager; the stage passes ``mode="reduce-overhead", fullgraph=True`` on CUDA).
    """

    def __init__(
        self, model: Any, prompt_ids: torch.Tensor, compile_options: dict[str, Any] | None = None
    ) -> None:
        import torch

        self.model = model
        self.lm = model.language_model
        self.device = prompt_ids.device
        self.prompt_ids = prompt_ids
        self.image_mask = (prompt_ids == model.config.image_token_index).unsqueeze(-1)
        self.compile_options = compile_options
        self.cudagraphs = compile_options is not None and compile_options.get("mode") in (
            "reduce-overhead",
            "max-autotune",
        )
        # transformers renamed the cache argument (past_key_values -> cache, 5.2x); take either.
        params = inspect.signature(self.lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache: Any = None
        self._cache_key: tuple[int, int] | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._steps: dict[bool, Any] = {}
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Tokens chosen per decoded chunk (the first from the prefill): shows the early exit.
        self.decode_steps: list[int] = []

    # -- the image half ---------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + Q-Former + projection: the language-model inputs of each image,
        computed as ``Blip2ForConditionalGeneration.generate`` computes them."""
        import torch

        m = self.model
        with torch.inference_mode():
            image_embeds = m.vision_model(pixel_values, return_dict=True).last_hidden_state
            image_attention_mask = torch.ones(
                image_embeds.size()[:-1], dtype=torch.long, device=image_embeds.device
            )
            query_tokens = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
            query_output = m.qformer(
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_attention_mask,
                return_dict=True,
            ).last_hidden_state
            if query_output.dtype != image_embeds.dtype:  # the Q-Former is kept in fp32
                query_output = query_output.to(image_embeds.dtype)
            return m.language_projection(query_output)

    def features_ahead(self, make_pixels: Any) -> Pending:
        """``features(make_pixels())``; on CUDA queued on a side stream, so it overlaps the decode
        of the chunk before (the host returns at once); elsewhere computed now."""
        import torch

        if self.side_stream is None:
            return Pending(self.features(make_pixels()))
        self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side_stream):
            feats = self.features(make_pixels())
            event = torch.cuda.Event()
            event.record(self.side_stream)
        return Pending(feats, event)

    # -- the text half ----------------------------------------------------------------------
    def release(self, compiled: bool = False) -> None:
        """Drop the cache and step buffers (a new batch shape); ``compiled``: the compiled steps
        and their CUDA graph memory too (after CUDA out-of-memory, before a smaller batch)."""
        self._cache = None
        self._cache_key = None
        self._buffers.clear()
        if compiled and self._steps and self.compile_options:
            import torch

            self._steps.clear()
            torch.compiler.reset()  # frees the recorded graphs' memory pool; recompiles next call

    def _static_cache(self, rows: int, length: int) -> Any:
        from transformers import StaticCache

        if self._cache_key != (rows, length):
            self.release()
            self._cache = StaticCache(config=self.lm.config, max_cache_len=length)
            self._cache_key = (rows, length)
        else:
            self._cache.reset()
        return self._cache

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any, fill: int = 0) -> torch.Tensor:
        import torch

        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = torch.full(shape, fill, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, beam_idx: torch.Tensor | None
    ) -> torch.Tensor:
        """One decode step for every row: (reorder the cache for beam search,) run the decoder on
        one new token per row, return the float32 logits ``[rows, vocab]``. Fixed shapes, no host
        sync, cache updated in place: what a CUDA graph needs."""
        cache = self._cache
        if beam_idx is not None:
            for layer in cache.layers:
                layer.keys.copy_(layer.keys.index_select(0, beam_idx))
                layer.values.copy_(layer.values.index_select(0, beam_idx))
        out = self.lm(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :].float()

    def _step_fn(self, beams: bool) -> Any:
        fn = self._steps.get(beams)
        if fn is None:
            if self.compile_options:
                import torch

                fn = torch.compile(self._forward, **self.compile_options)
            else:
                fn = self._forward
            self._steps[beams] = fn
        return fn

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, beam_idx: torch.Tensor | None
    ) -> torch.Tensor:
        import torch

        if self.cudagraphs:
            # Each call replays the graph into the same output memory: mark a new iteration
            # (the logits of the last one were consumed already).
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step_fn(beam_idx is not None)(tokens, positions, mask, beam_idx)
        return logits.clone() if self.cudagraphs else logits

    def _prefill(self, features: torch.Tensor, repeat: int, length: int) -> torch.Tensor:
        """Prompt of each image through the decoder once (eager, dynamic cache), copied ``repeat``
        times (beams) into the static cache; returns the float32 logits of the last prompt token."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        n, p = features.shape[0], self.prompt_ids.shape[1]
        ids = self.prompt_ids.expand(n, -1)
        embeds = self.lm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(
            self.image_mask.expand(n, -1, -1), features.to(embeds.device, embeds.dtype)
        )
        dyn = DynamicCache(config=self.lm.config)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=torch.ones(n, p, dtype=torch.long, device=self.device),
            position_ids=torch.arange(p, device=self.device).expand(n, -1),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: dyn},
        )
        cache = self._static_cache(n * repeat, length)
        for i, layer in enumerate(dyn.layers):
            # OPT's cache holds plain key/value layers (the union transformers types it as has
            # linear-attention layers too, which have no keys).
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            k, v = layer.keys, layer.values
            if repeat > 1:
                k, v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
            cache.update(k, v, i)
        logits = out.logits[:, -1, :].float()
        return logits.repeat_interleave(repeat, dim=0) if repeat > 1 else logits

    def _processors(self, s: FastSettings) -> Any:
        """transformers' own logits processors, built as ``generate`` builds them for these settings."""
        import torch
        from transformers import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
        )

        procs = LogitsProcessorList()
        if s.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if s.min_new_tokens > 0:
            eos = torch.tensor(s.eos_ids, device=self.device)
            procs.append(MinNewTokensLengthLogitsProcessor(self.prompt_ids.shape[1], s.min_new_tokens, eos))
        return procs

    def decode(self, features: torch.Tensor, s: FastSettings) -> torch.Tensor:
        """New token ids ``[n, max_new_tokens]`` for ``features`` ``[n, queries, hidden]``: the
        tokens ``generate`` gives, then ``pad_id`` after the end of each sequence."""
        import torch

        with torch.inference_mode():
            if s.num_beams == 1:
                return self._greedy(features, s)
            return self._beam(features, s)

    def _greedy(self, features: torch.Tensor, s: FastSettings) -> torch.Tensor:
        import torch

        n, p = features.shape[0], self.prompt_ids.shape[1]
        length = p + s.max_new_tokens
        eos = torch.tensor(s.eos_ids, device=self.device)
        procs = self._processors(s)
        seqs = torch.full((n, length), s.pad_id, dtype=torch.long, device=self.device)
        seqs[:, :p] = self.prompt_ids
        logits = self._prefill(features, 1, length)
        mask = self._buffer("mask", (n, length), torch.long, 1)
        tokens = self._buffer("tokens", (n, 1), torch.long)
        positions = self._buffer("positions", (n, 1), torch.long)
        unfinished = torch.ones(n, dtype=torch.bool, device=self.device)
        steps = 0
        for cur in range(p, length):
            if cur > p:
                tokens.copy_(seqs[:, cur - 1 : cur])
                positions.fill_(cur - 1)
                logits = self._step(tokens, positions, mask, None)
            scores = procs(seqs[:, :cur], logits) if procs else logits
            nxt = torch.argmax(scores, dim=-1)
            nxt = torch.where(unfinished, nxt, s.pad_id)
            seqs[:, cur] = nxt
            steps += 1
            unfinished &= ~torch.isin(nxt, eos)
            if not bool(unfinished.any()):  # every sequence ended: stop early
                break
        self.decode_steps.append(steps)
        return seqs[:, p:]

    def _beam(self, features: torch.Tensor, s: FastSettings) -> torch.Tensor:
        """Port of ``GenerationMixin._beam_search`` (transformers 5.24) for one returned sequence."""
        import torch

        n, k, p = features.shape[0], s.num_beams, self.prompt_ids.shape[1]
        max_length = p + s.max_new_tokens
        dev = self.device
        eos = torch.tensor(s.eos_ids, device=dev)
        procs = self._processors(s)
        beams_to_keep = max(2, 1 + len(s.eos_ids)) * k
        top_num_beam_mask = torch.cat(
            (torch.ones(k, dtype=torch.bool), torch.zeros(beams_to_keep - k, dtype=torch.bool))
        ).to(dev)
        # `pad_token_id or eos_token_id[0]` in transformers: a pad id of 0 falls back to EOS.
        fill = s.pad_id if s.pad_id else s.eos_ids[0]
        running_sequences = torch.full((n, k, max_length), fill, dtype=torch.int64, device=dev)
        running_sequences[:, :, :p] = self.prompt_ids
        sequences = running_sequences.clone()
        running_beam_scores = torch.zeros((n, k), dtype=torch.float, device=dev)
        running_beam_scores[:, 1:] = -1e9
        beam_scores = torch.full((n, k), -1e9, dtype=torch.float, device=dev)
        is_sent_finished = torch.zeros((n, k), dtype=torch.bool, device=dev)
        unsatisfied = torch.ones((n, 1), dtype=torch.bool, device=dev)
        running_beam_indices = torch.full((n, k, max_length - p), -1, dtype=torch.int32, device=dev)
        beam_indices = running_beam_indices.clone()
        batch_offset = torch.arange(n, device=dev).view(-1, 1) * k

        logits = self._prefill(features, k, max_length)
        mask = self._buffer("mask", (n * k, max_length), torch.long, 1)
        tokens = self._buffer("tokens", (n * k, 1), torch.long)
        positions = self._buffer("positions", (n * k, 1), torch.long)
        beam_idx = self._buffer("beam_idx", (n * k,), torch.long)
        cur = p
        steps = 0
        while True:
            if cur > p:
                tokens.copy_(running_sequences[:, :, cur - 1].reshape(n * k, 1))
                positions.fill_(cur - 1)
                logits = self._step(tokens, positions, mask, beam_idx)
            steps += 1
            log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
            if procs:
                log_probs = procs(running_sequences[:, :, :cur].reshape(n * k, cur), log_probs)
            vocab = log_probs.shape[-1]
            log_probs = log_probs.view(n, k, vocab) + running_beam_scores[:, :, None]
            log_probs = log_probs.reshape(n, k * vocab)

            # Top-K continuations over all beams of an image.
            topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
            topk_beam = topk_indices // vocab
            topk_running_beam_indices = _gather(running_beam_indices, topk_beam)
            topk_running_sequences = _gather(running_sequences, topk_beam)
            topk_ids = topk_indices % vocab
            topk_running_sequences[:, :, cur] = topk_ids
            topk_running_beam_indices[:, :, cur - p] = (topk_beam + batch_offset).to(torch.int32)

            # Which continuations end here: EOS, or the length limit.
            hits = torch.isin(topk_ids, eos)
            if cur + 1 >= max_length:
                hits = torch.ones_like(hits)

            # The best unfinished ones run on.
            topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
            next_topk = torch.topk(topk_running_log_probs, k=k)[1]
            running_sequences = _gather(topk_running_sequences, next_topk)
            running_beam_scores = _gather(topk_running_log_probs, next_topk)
            running_beam_indices = _gather(topk_running_beam_indices, next_topk)

            # Finished ones among the top k replace worse finished ones.
            just_finished = hits & top_num_beam_mask[None, :]
            finished_scores = topk_log_probs / ((cur + 1 - p) ** s.length_penalty)
            full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (s.early_stopping is True)
            finished_scores = finished_scores + full.to(torch.float32) * -1.0e9
            finished_scores = finished_scores + (~unsatisfied).to(torch.float32) * -1.0e9
            finished_scores = finished_scores + (~just_finished) * -1.0e9
            merged_scores = torch.cat((beam_scores, finished_scores), dim=1)
            keep = torch.topk(merged_scores, k=k)[1]
            sequences = _gather(torch.cat((sequences, topk_running_sequences), dim=1), keep)
            beam_scores = _gather(merged_scores, keep)
            beam_indices = _gather(torch.cat((beam_indices, topk_running_beam_indices), dim=1), keep)
            is_sent_finished = _gather(torch.cat((is_sent_finished, just_finished), dim=1), keep)

            # The rows the next step continues from (reordered inside the step, in place).
            beam_idx.copy_(running_beam_indices[..., cur - p].reshape(n * k))
            cur += 1

            # Can a running beam still beat the worst finished one? (transformers' heuristic)
            never = s.early_stopping == "never" and s.length_penalty > 0.0
            best_len = max_length - p if never else cur - p
            best_running = running_beam_scores[:, :1] / (best_len**s.length_penalty)
            worst_finished = torch.where(
                is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9
            )
            unsatisfied = unsatisfied & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
            going = torch.any(unsatisfied) & ~torch.all(hits)
            if s.early_stopping is True:
                going = going & ~torch.all(is_sent_finished)
            if not bool(going):  # every image's search has ended: stop early
                break
        self.decode_steps.append(steps)
        return sequences[:, 0, p:]


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[b, indices[b, j], ...]`` (transformers' ``_gather_beams``)."""
    import torch

    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)
