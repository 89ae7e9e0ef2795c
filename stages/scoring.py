"""CLIP (image <-> text) and CLAP (audio <-> text) scorers: loaded once per worker, batched.

The models are the real transformers classes, ``CLIPModel`` + ``CLIPProcessor`` (default
``openai/clip-vit-large-patch14``) and ``ClapModel`` + ``ClapProcessor`` (default
``laion/larger_clap_general``), loaded with ``from_pretrained`` from a Hub id (at a pinned
revision) or a local folder (the tests' and the demo's tiny stand-ins: ``standins/scorers.py``).
A score is the raw cosine of the two L2-normalized projected embeddings (CLIP's logit scale and
CLIPScore's ``2.5 * max(cos, 0)`` are left out: readers calibrate raw cosines as percentiles over
the run, :func:`stages.scores.percentile_ranks`).

Inputs are embedded once per distinct file or text and in chunks of ``batch_size``; a score is a
dot product of two cached embeddings, so five merges of one clip cost one audio forward. An input
that cannot be read gives a :class:`ScoreError` for that input only (the stage fails that clip).

Audio: stage 2 writes 16 kHz mono; CLAP's feature extractor is built for its own rate (48 kHz for
the LAION checkpoints) and refuses any other (it does not resample). The audio is resampled with
soxr at HQ quality, the band-limited resampler stage 2 already uses (``stages.audio.resample``;
cheaper than libswresample through PyAV here, BENCHMARKS.md), not by repeating samples, which
would fold images of the 0-8 kHz band into 8-24 kHz where CLAP's mel bins (up to 14 kHz) would
read them as sound. What stage 2 cut above 8 kHz stays missing: CLAP sees 16 kHz-band audio.
A clip longer than CLAP's window (10 s) is cut to its middle 10 s rather than the feature
extractor's random crop (``rand_trunc``), so a score is reproducible; a shorter one is
repeat-padded by the feature extractor as in LAION's training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import AbortRun
from pipeline.io import folder_fingerprint

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("avcaps")

CLIP_MODEL = "openai/clip-vit-large-patch14"
# Commits of the Hub repositories widely pinned in public code.
CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"
CLAP_MODEL = "laion/larger_clap_general"
CLAP_REVISION = "ada0c23a36c4e8582805bb38fec3905903f18b41"


def move_scorer_keys(data: Any, moved: dict[str, dict[str, str]]) -> Any:
    """A whole manifest's raw data with the scorer keys that moved (``moved``: section -> old key
    -> ``scoring.<key>``) moved into ``scoring:``, each with a warning, so a manifest or a run
    folder's ``config.yaml`` written before the move keeps working. Two places that give one new
    key different values (``caption.clip_model`` and ``merge.clip_model``, or either and
    ``scoring.clip_model``) are refused, naming them: which one was meant cannot be told."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    given = out.get("scoring")
    scoring = dict(given) if isinstance(given, dict) else {}
    came_from = {k: f"scoring.{k}" for k in scoring}
    clashes, notes = [], []
    for section, keys in moved.items():
        raw = out.get(section)
        if not isinstance(raw, dict) or not set(keys) & set(raw):
            continue
        raw = dict(raw)
        for old, new in keys.items():
            if old not in raw:
                continue
            value, key, where = raw.pop(old), new.removeprefix("scoring."), f"{section}.{old}"
            if key in scoring and scoring[key] != value:
                clashes.append(f"{came_from[key]}={scoring[key]!r} and {where}={value!r}")
                continue
            scoring.setdefault(key, value)
            came_from.setdefault(key, where)
            notes.append(f"{where} is now {new}")
        out[section] = raw
    if clashes:
        raise ValueError(
            "the scorer settings moved to one scoring: section, and these give one setting two values: "
            + "; ".join(clashes)
        )
    if notes:
        log.warning("%s (read in their new place this time: move them in the manifest)", "; ".join(notes))
        out["scoring"] = scoring
    return out


def moved_keys(data: Any, section: str, moved: dict[str, str]) -> Any:
    """A config section's raw data, refused with one message naming the new place of every key
    that moved (a manifest written before the keys moved)."""
    if isinstance(data, dict):
        found = [f"{section}.{k} is now {new}" for k, new in moved.items() if k in data]
        if found:
            raise ValueError("; ".join(found))
    return data


def model_ident(model: str, revision: str | None = None) -> str:
    """What a fingerprint records of a model: a local folder by its files (``local:<hash>``,
    however its path is spelled: relative, absolute, through a link), a Hub id with its revision."""
    if Path(model).expanduser().is_dir():
        return folder_fingerprint(Path(model).expanduser())
    return f"{model}@{revision}" if revision else model


class ScoringConfig(StrictModel):
    """The ``scoring:`` section: the CLIP and CLAP scorers and how they run, one for stages 3 and
    4 (each stage's ``score`` switch says whether it scores). A scorer's model and revision
    fingerprint the score columns only: another scorer re-scores, it makes no caption or merge stale."""

    clip_model: str = Field(CLIP_MODEL, description="CLIP model: Hub id or local folder.")
    clip_revision: str | None = Field(
        CLIP_REVISION, description="Hub commit of the CLIP model (ignored for a local folder)."
    )
    clap_model: str = Field(CLAP_MODEL, description="CLAP model: Hub id or local folder.")
    clap_revision: str | None = Field(
        CLAP_REVISION, description="Hub commit of the CLAP model (ignored for a local folder)."
    )
    device: str = Field("auto", description="The scorers' device: auto (cuda if any), cpu, cuda:N.")
    dtype: str = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU; or a torch dtype name.")
    batch_size: int = Field(64, gt=0, description="Inputs (images, clips, texts) per scorer forward.")
    local_files_only: bool = Field(False, description="Load the scorers from the local cache only.")

    def clip(self) -> ScorerSpec:
        return ScorerSpec(
            self.clip_model,
            self.clip_revision,
            self.device,
            self.dtype,
            self.batch_size,
            self.local_files_only,
        )

    def clap(self) -> ScorerSpec:
        return ScorerSpec(
            self.clap_model,
            self.clap_revision,
            self.device,
            self.dtype,
            self.batch_size,
            self.local_files_only,
        )


class ScoreError(Exception):
    """One input a scorer could not read; ``reason`` is the ledger's failure reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ScorerSpec:
    """Which model and how to run it (device, dtype and batch size change no score beyond float
    noise, so only ``model`` and ``revision`` belong in a stage's fingerprint)."""

    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64
    local_files_only: bool = False

    def ident(self) -> str:
        """What the score layer's fingerprint records of the model (:func:`model_ident`)."""
        return model_ident(self.model, self.revision)

    def legacy_ident(self) -> str:
        """``model@revision`` as fingerprints recorded it before models were known by content."""
        return (
            f"{self.model}@{self.revision}" if self.revision and not Path(self.model).is_dir() else self.model
        )


def torch_device(name: str, setting: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; a CUDA device asked for on a machine without one
    stops the run, naming the ``setting`` (the captioner and the scorers share this rule)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AbortRun(f"{setting}={name} but no CUDA device is available")
    return dev


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _embedding(out: Any) -> torch.Tensor:
    """The projected embedding, L2-normalized, in float32 (transformers 5 returns a model output
    whose ``pooler_output`` is the projection; older versions returned the tensor)."""
    import torch

    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    emb = emb.float()
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _Scorer:
    """Shared loading, text embedding and chunking of the CLIP and CLAP scorers."""

    what = "scorer"

    def __init__(
        self, spec: ScorerSpec, model: Any = None, processor: Any = None, pool: Executor | None = None
    ) -> None:
        """Load ``spec.model``; or take an already built ``model`` and ``processor`` (the
        benchmark's random-weight full-size models). ``pool`` reads input files ahead."""
        self.spec = spec
        self.device = torch_device(spec.device, "scorer device")
        self.dtype = torch_dtype(spec.dtype, self.device)
        if model is None:
            model, processor, self.revision = self._load(spec)
        else:
            self.revision = "in-memory"
        self.model = model.to(self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.pool = pool
        self._texts: dict[str, np.ndarray] = {}

    @property
    def ident(self) -> str:
        """``model@revision`` as loaded (a local folder's revision is a hash of its files)."""
        return f"{self.spec.model}@{self.revision}" if self.revision else self.spec.model

    def _classes(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _load(self, spec: ScorerSpec) -> tuple[Any, Any, str | None]:
        model_cls, proc_cls = self._classes()
        local = Path(spec.model).is_dir()
        if not local and (spec.model.startswith((".", "/", "~")) or spec.model.count("/") > 1):
            raise AbortRun(f"{self.what} model folder not found: {spec.model}")
        hub: dict[str, Any] = (
            {} if local else {"revision": spec.revision, "local_files_only": spec.local_files_only}
        )
        try:
            processor = proc_cls.from_pretrained(spec.model, **hub)
            model = model_cls.from_pretrained(spec.model, **hub, dtype=self.dtype)
        except (OSError, ValueError) as exc:  # not on the Hub / no network / not such a folder
            raise AbortRun(f"{self.what} model {spec.model!r} could not be loaded: {exc}") from exc
        return model, processor, (folder_fingerprint(spec.model) if local else spec.revision)

    def _chunks(self, items: Sequence[Any]) -> Iterable[Sequence[Any]]:
        n = self.spec.batch_size
        for i in range(0, len(items), n):
            yield items[i : i + n]

    def _text_forward(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def text_embeds(self, texts: Iterable[str]) -> dict[str, np.ndarray]:
        """Normalized embeddings of ``texts`` (each distinct text embedded once, cached)."""
        import torch

        texts = list(texts)
        if len(self._texts) > 100_000:  # a bounded cache: captions rarely repeat across batches
            self._texts.clear()
        todo = sorted({t for t in texts if t not in self._texts}, key=len)  # similar lengths pad less
        tok = self.processor.tokenizer
        for chunk in self._chunks(todo):
            enc = tok(list(chunk), padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                emb = _embedding(self._text_forward(enc)).cpu().numpy()
            self._texts.update(zip(chunk, emb, strict=True))
        return {t: self._texts[t] for t in texts}

    def _read_all(self, paths: Sequence[Path], read: Any) -> list[Any]:
        """``read`` over ``paths`` (in the pool when there is one), a ScoreError kept per input."""

        def safe(p: Path) -> Any:
            try:
                return read(p)
            except ScoreError as exc:
                return exc

        if self.pool is None:
            return [safe(p) for p in paths]
        return list(self.pool.map(safe, paths))


class ClipScorer(_Scorer):
    """CLIP image <-> text: ``image_embeds`` of JPEG files and ``text_embeds`` of captions."""

    what = "CLIP"

    def _classes(self) -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        return CLIPModel, CLIPProcessor

    def _text_forward(self, enc: dict[str, Any]) -> Any:
        return self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    @staticmethod
    def read_image(path: Path) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as exc:
            raise ScoreError("score_missing_frame", f"{path}: file not found") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ScoreError("score_unreadable_frame", f"{path}: {exc}") from exc

    def image_embeds(self, paths: Iterable[Path]) -> dict[Path, np.ndarray | ScoreError]:
        """Normalized embeddings of the images at ``paths`` (each distinct path read once)."""
        import torch

        unique = list(dict.fromkeys(paths))
        out: dict[Path, np.ndarray | ScoreError] = {}
        for chunk in self._chunks(unique):
            images = self._read_all(chunk, self.read_image)
            good = [(p, im) for p, im in zip(chunk, images, strict=True) if not isinstance(im, ScoreError)]
            out.update((p, im) for p, im in zip(chunk, images, strict=True) if isinstance(im, ScoreError))
            if not good:
                continue
            pix = self.processor.image_processor(images=[im for _, im in good], return_tensors="pt")
            pixel_values = pix["pixel_values"].to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                emb = _embedding(self.model.get_image_features(pixel_values=pixel_values)).cpu().numpy()
            out.update((p, e) for (p, _), e in zip(good, emb, strict=True))
        return out


class ClapScorer(_Scorer):
    """CLAP audio <-> text: ``audio_embeds`` of audio files (any rate) and ``text_embeds``."""

    what = "CLAP"

    def __init__(
        self, spec: ScorerSpec, model: Any = None, processor: Any = None, pool: Executor | None = None
    ) -> None:
        super().__init__(spec, model, processor, pool)
        fe = self.processor.feature_extractor
        self.rate = int(fe.sampling_rate)
        self.window = int(fe.nb_max_samples)  # max_length_s * rate: what CLAP sees of a clip

    def _classes(self) -> tuple[Any, Any]:
        from transformers import ClapModel, ClapProcessor

        return ClapModel, ClapProcessor

    def _text_forward(self, enc: dict[str, Any]) -> Any:
        return self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def read_audio(self, path: Path) -> np.ndarray:
        """Mono float32 at CLAP's rate (soxr HQ), the middle ``window`` samples of a longer clip."""
        import numpy as np
        import soundfile as sf

        from stages.audio import resample

        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except FileNotFoundError as exc:
            raise ScoreError("score_missing_audio", f"{path}: file not found") from exc
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
            raise ScoreError("score_unreadable_audio", f"{path}: {exc}") from exc
        if data.shape[0] == 0:
            raise ScoreError("score_unreadable_audio", f"{path}: no audio samples")
        mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
        audio = resample(np.ascontiguousarray(mono, dtype=np.float32), int(rate), self.rate)
        if len(audio) > self.window:
            start = (len(audio) - self.window) // 2
            audio = audio[start : start + self.window]
        return audio

    def audio_embeds(self, paths: Iterable[Path]) -> dict[Path, np.ndarray | ScoreError]:
        """Normalized embeddings of the audio files at ``paths`` (each distinct path read once)."""
        import torch

        unique = list(dict.fromkeys(paths))
        out: dict[Path, np.ndarray | ScoreError] = {}
        fe = self.processor.feature_extractor
        for chunk in self._chunks(unique):
            waves = self._read_all(chunk, self.read_audio)
            good = [(p, w) for p, w in zip(chunk, waves, strict=True) if not isinstance(w, ScoreError)]
            out.update((p, w) for p, w in zip(chunk, waves, strict=True) if isinstance(w, ScoreError))
            if not good:
                continue
            feats = fe([w for _, w in good], sampling_rate=self.rate, return_tensors="pt")
            kw = {"input_features": feats["input_features"].to(self.device, dtype=self.dtype)}
            if "is_longer" in feats:
                kw["is_longer"] = feats["is_longer"].to(self.device)
            with torch.inference_mode():
                emb = _embedding(self.model.get_audio_features(**kw)).cpu().numpy()
            out.update((p, e) for (p, _), e in zip(good, emb, strict=True))
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two normalized embeddings, rounded to float32 as the ledgers store it."""
    import numpy as np

    return float(np.float32(np.dot(a.astype(np.float64), b.astype(np.float64))))
