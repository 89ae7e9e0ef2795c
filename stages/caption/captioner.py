"""BLIP-2 loaded once: uint8 frames in, cleaned captions out (used by the stage and the benchmark).

The model runs on chunks of ``gen_batch_size`` images, halved on CUDA out-of-memory (and kept
halved, counted in ``oom_events``); pixels travel as uint8 and are normalized on the device.

Decoding (``caption.decoder``): ``generate`` (default) calls transformers' ``generate``; ``fast``
uses :mod:`stages.caption.fast` (fixed-shape cache, the step compiled as a CUDA graph on CUDA,
the next chunk's vision half overlapped), which gives the same tokens (checked on CPU in
``tests/caption/test_caption_fast.py``); its GPU speed has not been measured yet, so it is not
the default.

Text cleaning (:func:`clean_caption`): special tokens dropped, control and format characters
removed (not turned into spaces, unlike the merge gate's cleaner), whitespace collapsed, and a
caption cut by ``max_new_tokens`` loses its trailing (probably partial) word.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.io import folder_fingerprint
from stages.caption.config import CaptionConfig
from stages.scoring import torch_device, torch_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch

    from stages.caption.fast import FastDecoder

log = logging.getLogger("avcaps")

# Bump when the text cleaning changes: it is part of the settings hash.
CLEANING_VERSION = 1


def clean_caption(text: str, cut: bool) -> str:
    """Strip, drop control characters, collapse whitespace; drop the partial word of a cut caption."""
    kept = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")
        elif ch != "\ufffd" and not unicodedata.category(ch).startswith("C"):
            kept.append(ch)  # U+FFFD: bytes that decode to no character (split multi-byte tokens)
    words = "".join(kept).split()
    if cut and len(words) > 1 and not re.search(r"[.!?,;:)\]\"']$", words[-1]):
        words = words[:-1]
    return " ".join(words)


@dataclass
class Decoding:
    """One decoding setting; ``retry`` is the variant used once for empty captions."""

    num_beams: int
    max_new_tokens: int
    repetition_penalty: float
    min_new_tokens: int = 0

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "do_sample": False,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        return kw

    def retry(self) -> Decoding:
        return Decoding(
            self.num_beams,
            self.max_new_tokens,
            max(1.3, self.repetition_penalty),
            max(self.min_new_tokens, min(3, self.max_new_tokens)),
        )


class FrameError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Captioner:
    """BLIP-2 loaded once: uint8 frames in, cleaned captions out. Used by the stage and the bench."""

    def __init__(self, cfg: CaptionConfig, model: Any = None, processor: Any = None) -> None:
        """Load ``cfg.model``; or take an already built ``model`` and ``processor`` (the benchmark's
        random-weight full-size model, built on the GPU instead of saved and reloaded)."""
        import torch

        self.cfg = cfg
        self.device = torch_device(cfg.device, "caption.device")
        self.dtype = torch_dtype(cfg.dtype, self.device)
        if model is None:
            model, self.revision = self._load(cfg)
        else:
            self.processor, self.revision = processor, "in-memory"
        if not cfg.device_map:
            model = model.to(self.device)
        self.model = model.eval()
        self._prepare_text()
        ip = self.processor.image_processor
        size = ip.size
        self.size = (int(size["width"]), int(size["height"]))
        self.resample = int(getattr(ip, "resample", 3))
        self.rescale = float(ip.rescale_factor) if ip.do_rescale else 1.0
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.normalize = bool(ip.do_normalize)
        self.gen_batch = cfg.gen_batch_size
        self.oom_events: list[dict[str, int]] = []
        self.decoding = Decoding(
            cfg.num_beams, cfg.max_new_tokens, cfg.repetition_penalty, cfg.min_new_tokens
        )
        self.fast: FastDecoder | None = None
        self.chunks_per_call = 1
        if cfg.decoder == "fast":
            self._start_fast()

    def _load(self, cfg: CaptionConfig) -> tuple[Any, str | None]:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        local = Path(cfg.model).is_dir()
        if not local and (cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1):
            raise AbortRun(f"caption.model folder not found: {cfg.model}")
        hub: dict[str, Any] = (
            {} if local else {"revision": cfg.revision, "local_files_only": cfg.local_files_only}
        )
        try:
            self.processor = Blip2Processor.from_pretrained(cfg.model, **hub)
            load: dict[str, Any] = {"dtype": self.dtype}
            if cfg.device_map:
                load["device_map"] = cfg.device_map
            model = Blip2ForConditionalGeneration.from_pretrained(cfg.model, **hub, **load)
        except (OSError, ValueError) as exc:  # not on the Hub / no network / not a BLIP-2 folder
            raise AbortRun(f"caption.model {cfg.model!r} could not be loaded: {exc}") from exc
        return model, (folder_fingerprint(cfg.model) if local else cfg.revision)

    def _prepare_text(self) -> None:
        """The prompt's token ids, once: image placeholders + BOS + prompt, as the processor makes them.

        ``num_query_tokens`` must be set on the processor, else a prompt silently drops the image
        (checkpoints saved before it existed lack it: take it from the model config).
        """
        import torch
        from PIL import Image

        proc = self.processor
        if getattr(proc, "num_query_tokens", None) is None:
            proc.num_query_tokens = self.model.config.num_query_tokens
        if self.model.config.image_token_index is None:
            # A checkpoint saved before BLIP-2 had an <image> token (early revisions of
            # blip2-opt-2.7b): Blip2Processor has added the token to the tokenizer; the query
            # embeddings overwrite its embedding row, so any row will do, but it must exist.
            token_id = proc.tokenizer.convert_tokens_to_ids(
                getattr(proc.image_token, "content", proc.image_token)
            )
            if token_id >= self.model.get_input_embeddings().num_embeddings:
                self.model.resize_token_embeddings(token_id + 1, pad_to_multiple_of=64)
            self.model.config.image_token_index = token_id
        proc.tokenizer.padding_side = "left"
        enc = proc(images=Image.new("RGB", (8, 8)), text=self.cfg.prompt or "", return_tensors="pt")
        ids = enc["input_ids"]
        n_img = int((ids == self.model.config.image_token_index).sum())
        if n_img != self.model.config.num_query_tokens:
            raise AbortRun(
                f"the processor put {n_img} image tokens in the prompt, the model expects "
                f"{self.model.config.num_query_tokens}"
            )
        self.input_ids = ids.to(self.device)
        self.attention_mask = enc["attention_mask"].to(self.device)
        # generate() stops on the language model's generation config (BLIP-2's own
        # generation_config.json does not reach it), so the EOS that marks an uncut caption is its.
        eos = self.model.language_model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.text_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_ids.discard(None)
        self.eos_tensor = torch.tensor(sorted(self.eos_ids), dtype=torch.long)
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True

    # -- images --------------------------------------------------------------------------------
    def load_frame(self, path: Path) -> np.ndarray:
        """Decode and resize one JPEG to the model's input size (uint8 HxWx3), as the processor does."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except FileNotFoundError as exc:
            raise FrameError("missing_frame", f"{path}: file not found") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise FrameError("corrupt_frame", f"{path}: {exc}") from exc
        if rgb.size != self.size:
            rgb = rgb.resize(self.size, resample=self.resample)
        return np.asarray(rgb, dtype=np.uint8)

    def pixel_values(self, frames: list[np.ndarray]) -> torch.Tensor:
        """uint8 frames -> normalized pixel tensor on the device (4x less to copy than float)."""
        import numpy as np
        import torch

        batch = torch.from_numpy(np.stack(frames))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() * self.rescale
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.to(self.dtype)

    # -- generation ----------------------------------------------------------------------------
    def _start_fast(self) -> None:
        """The fast decoder (``caption.decoder: fast``), after the prompt is known."""
        from stages.caption.fast import FastDecoder, UnsupportedDecoding, settings_for

        gc = self.model.language_model.generation_config
        try:  # both settings the stage uses, so a refusal comes now and not mid-run
            for decoding in (self.decoding, self.decoding.retry()):
                settings_for(gc, decoding.kwargs())
        except UnsupportedDecoding as exc:
            raise AbortRun(f"caption.decoder=fast cannot reproduce generate() here: {exc}") from exc
        compile_on = self.cfg.compile if self.cfg.compile is not None else self.device.type == "cuda"
        # reduce-overhead: inductor kernels replayed as one CUDA graph per step (on CUDA);
        # dynamic=False: one specialised graph per batch shape, never a symbolic-shape one.
        options = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False} if compile_on else None
        self.fast = FastDecoder(self.model, self.input_ids, options)
        # Give generate() several chunks per call, so the image half of chunk k+1 can run while
        # chunk k decodes (CaptionStage.process groups this many chunks before it calls).
        self.chunks_per_call = 4

    def _simulated_oom(self, n: int) -> None:
        import torch

        if self.cfg.simulate_oom_above is not None and n > self.cfg.simulate_oom_above:
            raise torch.OutOfMemoryError(f"simulated: {n} images > caption.simulate_oom_above")

    def _generate_ids(self, frames: list[np.ndarray], decoding: Decoding) -> torch.Tensor:
        """One generate() call: the new token ids ``[n, T]`` (on the CPU)."""
        import torch

        n = len(frames)
        if self.cfg.static_cache and n < self.gen_batch:
            frames = frames + [frames[-1]] * (self.gen_batch - n)  # one shape for compiled graphs
        pixels = self.pixel_values(frames)
        kw = decoding.kwargs()
        if self.cfg.static_cache:
            kw["cache_implementation"] = "static"
            kw["disable_compile"] = not self.cfg.compile
        m = len(frames)
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=pixels,
                input_ids=self.input_ids.expand(m, -1),
                attention_mask=self.attention_mask.expand(m, -1),
                **kw,
            )
        # OPT is decoder-only: its output starts with the prompt (image tokens, BOS, prompt text).
        return out[:n, self.input_ids.shape[1] :].cpu()

    def _fast_ids(self, features: torch.Tensor, n: int, decoding: Decoding) -> torch.Tensor:
        """The fast decoder on one chunk: rows padded to ``gen_batch`` with copies of the last
        image (one shape for the captured step), the padding dropped from the result."""
        import torch

        from stages.caption.fast import settings_for

        assert self.fast is not None
        settings = settings_for(self.model.language_model.generation_config, decoding.kwargs())
        if n < self.gen_batch:
            pad = features[-1:].expand(self.gen_batch - n, *features.shape[1:])
            features = torch.cat([features, pad])
        return self.fast.decode(features, settings)[:n].cpu()

    def _texts(self, new: torch.Tensor) -> list[tuple[str, bool]]:
        """(decoded text, cut at max_new_tokens) per row of new token ids."""
        import torch

        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        cut = (~torch.isin(new, self.eos_tensor).any(dim=1)).tolist()  # no EOS: stopped by max_new_tokens
        return list(zip(texts, cut, strict=True))

    def _generate(self, frames: list[np.ndarray], decoding: Decoding) -> list[tuple[str, bool]]:
        """One generate() call: (decoded text, cut at max_new_tokens) per frame."""
        self._simulated_oom(len(frames))
        return self._texts(self._generate_ids(frames, decoding))

    def _chunk_ids(self, frames: list[np.ndarray], decoding: Decoding) -> list[torch.Tensor]:
        """New token ids of ``frames``, one tensor per chunk of the current batch size, halving
        the batch on CUDA out-of-memory. With the fast decoder the image half of the next chunk
        is started before this chunk decodes (on CUDA it runs alongside, on a side stream)."""
        import torch

        out: list[torch.Tensor] = []
        ahead: tuple[tuple[int, int], Any] | None = None  # ((start, size), Pending) of the next chunk
        i = 0
        while i < len(frames):
            size = self.gen_batch
            chunk = frames[i : i + size]
            try:
                self._simulated_oom(len(chunk))
                if self.fast is None:
                    ids = self._generate_ids(chunk, decoding)
                else:
                    if ahead is not None and ahead[0] == (i, size):
                        features = ahead[1].result()
                    else:
                        features = self.fast.features(self.pixel_values(chunk))
                    ahead = None
                    nxt = frames[i + size : i + 2 * size]
                    if nxt:
                        pending = self.fast.features_ahead(lambda nxt=nxt: self.pixel_values(nxt))
                        ahead = ((i + size, size), pending)
                    ids = self._fast_ids(features, len(chunk), decoding)
            except torch.OutOfMemoryError:
                ahead = None
                if self.fast is not None:
                    self.fast.release(compiled=True)
                if self.gen_batch == 1:
                    raise
                before = self.gen_batch
                self.gen_batch = max(1, self.gen_batch // 2)
                self.oom_events.append({"from": before, "to": self.gen_batch})
                log.warning(
                    "caption: CUDA out of memory at %d images per call; now %d", before, self.gen_batch
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            out.append(ids)
            i += len(chunk)
        return out

    def token_ids(self, frames: list[np.ndarray], decoding: Decoding | None = None) -> list[list[int]]:
        """The new token ids of each frame up to and with its first EOS (all of them when it has
        none): what both decoders must agree on, whatever padding follows."""
        rows: list[list[int]] = []
        for ids in self._chunk_ids(frames, decoding or self.decoding):
            for row in ids.tolist():
                end = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
                rows.append(row if end is None else row[: end + 1])
        return rows

    def generate(self, frames: list[np.ndarray], decoding: Decoding | None = None) -> list[str]:
        """Cleaned captions for ``frames``, in chunks of the current batch size, halving on OOM."""
        out: list[str] = []
        for ids in self._chunk_ids(frames, decoding or self.decoding):
            out.extend(clean_caption(text, cut) for text, cut in self._texts(ids))
        return out

    def caption(self, frames: list[np.ndarray]) -> list[str]:
        """Captions with the configured decoding; empty ones retried once with :meth:`Decoding.retry`."""
        caps = self.generate(frames)
        empty = [k for k, c in enumerate(caps) if not c]
        if empty:
            again = self.generate([frames[k] for k in empty], self.decoding.retry())
            for k, c in zip(empty, again, strict=True):
                caps[k] = c
        return caps
