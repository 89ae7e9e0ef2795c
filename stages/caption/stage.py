"""Stage 3: caption every keyframe of a clip with BLIP-2.

Input (stage 2's columns): ``frame_paths`` (JPEGs relative to the run folder) and ``middle_frame``.
Output: ``frame_captions`` (one per frame), ``visual_caption`` (the caption of the frame chosen by
``caption.caption_frame``, the middle one by default) and provenance on every row (model id,
revision, dtype, a hash of every setting that changes the text, library versions).

How it keeps the accelerator busy: JPEG decoding and resizing run in a thread pool that works
ahead while the model generates; identical frames (a still-image video gives N equal keyframes)
are captioned once; pixels travel as uint8 and are normalized on the device; the model runs on
chunks of ``gen_batch_size`` images, halved on CUDA out-of-memory (and kept halved, counted in
``stats.json``). The prompt is the same for every image, so a batch needs no text padding, and
the caption of an image does not depend on its neighbours (``tests/caption`` checks it).

The model and its text cleaning are :mod:`stages.caption.captioner`, the fixed-shape decoder of
``caption.decoder: fast`` :mod:`stages.caption.fast`, the settings :mod:`stages.caption.config`.
An empty caption is retried once with different decoding (``min_new_tokens`` and a repetition
penalty); still empty, the clip fails with reason ``empty_caption``. After captioning,
:meth:`CaptionStage.score` adds a CLIP score per frame caption (keyframe i <-> caption i,
:mod:`stages.scoring`) unless ``caption.score`` is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PermanentError, TransientError
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.caption.captioner import CLEANING_VERSION, Captioner, FrameError
from stages.caption.config import CaptionConfig
from stages.keyframes import middle_index
from stages.scores import VISUAL_CLIP, caption_score_fields
from stages.scoring import ClipScorer, ScoreError, ScorerSpec, ScoringConfig, cosine, model_ident

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger("avcaps")


def settings_hash(cfg: CaptionConfig, legacy: bool = False) -> str:
    """A short hash of every setting that changes the caption text (not batch sizes or devices);
    the model by its files when it is a local folder (``legacy``: by its name, as rows made before
    models were known by content recorded it)."""
    model = (
        {"model": cfg.model, "revision": cfg.revision}
        if legacy
        else {"model": model_ident(cfg.model, cfg.revision)}
    )
    keys = {
        **model,
        "dtype": cfg.dtype,
        "prompt": cfg.prompt,
        "num_beams": cfg.num_beams,
        "max_new_tokens": cfg.max_new_tokens,
        "min_new_tokens": cfg.min_new_tokens,
        "repetition_penalty": cfg.repetition_penalty,
        "caption_frame": cfg.caption_frame,
        "cleaning": CLEANING_VERSION,
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "accelerate", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return json.dumps(out, sort_keys=True)


def pick_frame(choice: str | int, n: int, middle: int | None) -> int:
    """The frame whose caption is the clip's visual caption (``caption.caption_frame``)."""
    if choice == "middle":
        return middle_index(n, middle) or 0
    if choice == "first":
        return 0
    if choice == "last":
        return n - 1
    return max(0, min(int(choice), n - 1))


class CaptionStage(ItemStage[CaptionConfig]):
    number = 3
    name = "caption"
    upstream = "keyframes"
    description = "Caption every keyframe with BLIP-2; the middle frame's caption is the clip's."
    resources = Resources(cpus=4, gpus=1)

    uses = (ScoringConfig,)  # the CLIP scorer (scoring: section), shared with stage 4
    layer_columns = (VISUAL_CLIP, "clip_model")
    layer_name = "scores"

    def fingerprint_settings(self) -> dict[str, Any]:
        # What the caption text is made with. The scorer is not here: its scores are the layer.
        return {"settings_hash": settings_hash(self.cfg)}

    def legacy_fingerprint_settings(self) -> list[dict[str, Any]]:
        # Before scores were a layer, the scorer was part of the row's fingerprint.
        clip = self.clip_spec().legacy_ident() if self.cfg.score else None
        return [{"settings_hash": settings_hash(self.cfg, legacy=True), "clip": clip}]

    def reads(self) -> tuple[str, ...]:
        # The keyframes (by their files' digests) and which of them is the middle one.
        return ("frame_paths", "middle_frame")

    def layer_settings(self) -> dict[str, Any] | None:
        return {"clip": self.clip_spec().ident()} if self.cfg.score else None

    def clip_spec(self) -> ScorerSpec:
        return self.section(ScoringConfig).clip()

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            pa.field("visual_caption", pa.string()),
            pa.field("frame_captions", pa.list_(pa.string())),
            pa.field("caption_model", pa.string()),
            pa.field("caption_revision", pa.string()),
            pa.field("caption_dtype", pa.string()),
            pa.field("caption_settings_hash", pa.string()),
            pa.field("caption_versions", pa.string()),
            pa.field("caption_gen_batch", pa.int32()),
            *caption_score_fields(),
        ]

    def write_dirs(self) -> list[Path]:
        """The ledger and stats only: this stage reads the keyframes and writes none, so its media may sit on
        a full or read-only disk (copied to a GPU box, say)."""
        return [d for d in super().write_dirs() if d != self.ctx.tmp_dir]

    def setup(self) -> None:
        # A run that only re-scores (another scorer) never loads BLIP-2.
        captioner = Captioner(self.cfg) if "process" in self.work else None
        self.start(captioner, ClipScorer(self.clip_spec()) if self.cfg.score else None)

    def start(self, captioner: Captioner | None, scorer: ClipScorer | None = None) -> None:
        """Take a loaded captioner and scorer (``setup`` loads them; the benchmark passes its own;
        without a scorer the score columns stay empty; without a captioner only scores are made)."""
        self.pool = ThreadPoolExecutor(self.cfg.loader_workers, thread_name_prefix="caption-load")
        self.scorer = scorer
        if scorer is not None:
            scorer.pool = self.pool  # JPEGs are read ahead in the same threads
        self.unique_frames = 0
        self.total_frames = 0
        if captioner is None:
            return
        self.captioner = captioner
        self.provenance = {
            "caption_model": self.cfg.model,
            "caption_revision": self.captioner.revision,
            "caption_dtype": str(self.captioner.dtype).removeprefix("torch."),
            "caption_settings_hash": settings_hash(self.cfg),
            "caption_versions": library_versions(),
        }

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.__dict__.pop("scorer", None)
        cap = self.__dict__.pop("captioner", None)
        if cap is not None:
            self.oom_events = cap.oom_events
            self.gen_batch_final = cap.gen_batch

    def _frames(self, batch: list[Item]) -> tuple[list[tuple[int, int, Path]], dict[str, FrameError]]:
        """(item index, frame index, absolute path) of every frame; items with no frames fail."""
        jobs: list[tuple[int, int, Path]] = []
        bad: dict[str, FrameError] = {}
        for i, item in enumerate(batch):
            paths = item.data.get("frame_paths") or []
            if not paths:
                bad[item.clip_id] = FrameError("no_frames", f"clip {item.clip_id} has no frame_paths")
            for k, rel in enumerate(paths):
                jobs.append((i, k, self.ctx.workdir / rel))
        return jobs, bad

    def _decoded(
        self, jobs: list[tuple[int, int, Path]]
    ) -> Iterator[tuple[int, int, np.ndarray | FrameError]]:
        """Frames decoded by the pool, in order. The pool runs ahead of the model by up to four
        generate() chunks, which bounds the memory held by decoded frames."""
        ahead = 4 * self.cfg.gen_batch_size
        queue: deque[Future[np.ndarray]] = deque()
        submitted = 0
        for i, k, _ in jobs:
            while submitted < len(jobs) and len(queue) < ahead:
                queue.append(self.pool.submit(self.captioner.load_frame, jobs[submitted][2]))
                submitted += 1
            try:
                yield i, k, queue.popleft().result()
            except FrameError as exc:
                yield i, k, exc

    def process(self, batch: list[Item]) -> list[Result]:
        import torch

        jobs, bad = self._frames(batch)
        n_frames = [len(item.data.get("frame_paths") or []) for item in batch]
        key_of: dict[tuple[int, int], str] = {}
        text_of: dict[str, str] = {}
        pending: dict[str, np.ndarray] = {}

        def flush() -> None:
            keys = list(pending)
            for key, cap in zip(keys, self.captioner.caption([pending[k] for k in keys]), strict=True):
                text_of[key] = cap
            pending.clear()

        try:
            for i, k, frame in self._decoded(jobs):
                clip_id = batch[i].clip_id
                if isinstance(frame, FrameError):
                    bad.setdefault(clip_id, frame)
                    continue
                if clip_id in bad:
                    continue
                self.total_frames += 1
                if self.cfg.dedup_frames:
                    key = hashlib.blake2b(frame.tobytes(), digest_size=16).hexdigest()
                else:
                    key = f"{i}:{k}"
                key_of[(i, k)] = key
                if key in text_of or key in pending:
                    continue
                self.unique_frames += 1
                pending[key] = frame
                if len(pending) >= self.captioner.gen_batch * self.captioner.chunks_per_call:
                    flush()
            if pending:
                flush()
        except torch.OutOfMemoryError as exc:
            # Out of memory even one image at a time: nothing in this batch can be done now.
            err = TransientError("cuda_oom", f"CUDA out of memory at 1 image per call: {exc}")
            return [Result.failed(item.clip_id, err) for item in batch]

        results: list[Result] = []
        for i, item in enumerate(batch):
            if item.clip_id in bad:
                e = bad[item.clip_id]
                results.append(Result.failed(item.clip_id, PermanentError(e.reason, str(e))))
                continue
            caps = [text_of[key_of[(i, k)]] for k in range(n_frames[i])]
            empty = [k for k, c in enumerate(caps) if not c]
            if empty:
                paths = item.data["frame_paths"]
                where = ", ".join(paths[k] for k in empty)
                msg = f"empty caption after a retry with other decoding for {where}"
                results.append(Result.failed(item.clip_id, PermanentError("empty_caption", msg)))
                continue
            chosen = pick_frame(self.cfg.caption_frame, len(caps), item.data.get("middle_frame"))
            results.append(
                Result.ok(
                    item.clip_id,
                    visual_caption=caps[chosen],
                    frame_captions=caps,
                    caption_gen_batch=self.captioner.gen_batch,
                    **self.provenance,
                )
            )
        return self.scored(batch, results)

    def refresh(self, batch: list[Item]) -> list[Result]:
        """New scores for rows whose captions are current (another CLIP scorer, or scores that
        were not made): the row's captions as they are, BLIP-2 untouched."""
        results = [Result.ok(item.clip_id, **(item.previous or {})) for item in batch]
        for r in results:
            r.outputs.pop("fingerprint", None)
            r.outputs.pop("layer_fingerprint", None)
        return self.scored(batch, results)

    def scored(self, batch: list[Item], results: list[Result]) -> list[Result]:
        """The ok results with their scores, or, when scoring fails for the batch (CUDA out of
        memory), with their captions and no scores: the layer is left to the next run."""
        import torch

        if self.scorer is None:
            return results
        try:
            return self.score(batch, results)
        except torch.OutOfMemoryError as exc:
            log.warning("%s: CLIP ran out of CUDA memory; captions kept, scores left to the next run: %s",
                        self.dirname(), exc)  # fmt: skip
            for r in results:
                if r.status == "ok":
                    r.layer = False
                    r.message = f"scores not made: CUDA out of memory in CLIP scoring: {exc}"[:500]
            return results

    def score(self, batch: list[Item], results: list[Result]) -> list[Result]:
        """Add ``visual_clip_score`` (keyframe i <-> frame caption i) to the ok results: every
        distinct frame and caption of the batch embedded once, in batches. A frame the scorer
        cannot read leaves its clip without scores (its captions kept), not the batch."""
        assert self.scorer is not None
        ok = {r.clip_id: r for r in results if r.status == "ok"}
        paths = {
            item.clip_id: [self.ctx.workdir / p for p in item.data["frame_paths"]]
            for item in batch
            if item.clip_id in ok
        }
        images = self.scorer.image_embeds(p for ps in paths.values() for p in ps)
        texts = self.scorer.text_embeds(c for r in ok.values() for c in r.outputs["frame_captions"])
        out: list[Result] = []
        for r in results:
            if r.clip_id not in ok:
                out.append(r)
                continue
            embs = [images[p] for p in paths[r.clip_id]]
            bad = next((e for e in embs if isinstance(e, ScoreError)), None)
            if bad is not None:
                r.layer = False
                r.message = f"scores not made ({bad.reason}): CLIP cannot score its keyframe: {bad}"[:500]
                out.append(r)
                continue
            caps = r.outputs["frame_captions"]
            vectors = [e for e in embs if not isinstance(e, ScoreError)]  # every one, checked above
            scores = [cosine(e, texts[c]) for e, c in zip(vectors, caps, strict=True)]
            out.append(
                Result.ok(r.clip_id, **{**r.outputs, VISUAL_CLIP: scores, "clip_model": self.scorer.ident})
            )
        return out

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        out: dict[str, Any] = {"settings_hash": settings_hash(self.cfg)}
        if hasattr(self, "provenance"):  # this process ran the model (not a `nothing to do` run)
            out["frames_seen"] = self.total_frames
            out["frames_captioned"] = self.unique_frames
            out["oom_backoffs"] = getattr(self, "oom_events", [])
            out["gen_batch_size_final"] = getattr(self, "gen_batch_final", self.cfg.gen_batch_size)
        if not state.empty and "visual_caption" in state.columns:
            ok = state[state["status"] == "ok"]
            if len(ok):
                out["mean_caption_words"] = round(float(ok["visual_caption"].str.split().str.len().mean()), 2)
        return out
