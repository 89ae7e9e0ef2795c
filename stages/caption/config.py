"""Stage 3's section of the run manifest (``caption:``): the model, decoding and batching."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StageConfig
from stages.scoring import moved_keys

# Settings that moved to the shared scoring: section (issue 25): old manifests get a line saying where.
MOVED = {
    "clip_model": "scoring.clip_model",
    "clip_revision": "scoring.clip_revision",
    "clip_batch_size": "scoring.batch_size",
}

# A commit of https://huggingface.co/Salesforce/blip2-opt-2.7b widely pinned in public code.
DEFAULT_REVISION = "51572668da0eb669e01a189dc22abe6088589a24"


class CaptionConfig(StageConfig):
    batch_size: int = Field(256, gt=0, description="Clips per process() call and per ledger commit.")
    model: str = Field("Salesforce/blip2-opt-2.7b", description="Hub model id or local folder.")
    revision: str | None = Field(
        DEFAULT_REVISION, description="Hub commit of the model (ignored for a local folder)."
    )
    local_files_only: bool = Field(False, description="Never contact the Hub (use the local cache).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    device_map: str | None = Field(
        None, description="accelerate device_map (e.g. auto) for a model that does not fit one GPU."
    )
    prompt: str | None = Field(None, description='Text the caption continues, e.g. "a photo of".')
    num_beams: int = Field(5, gt=0, description="Beam search width (1 = greedy).")
    max_new_tokens: int = Field(30, gt=0, description="Caption length cap in tokens.")
    min_new_tokens: int = Field(0, ge=0, description="Tokens generated before EOS is allowed.")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 = none.")
    gen_batch_size: int = Field(64, gt=0, description="Images per model call; halved on OOM.")
    loader_workers: int = Field(4, gt=0, description="Threads decoding and resizing JPEGs ahead.")
    caption_frame: Literal["middle", "first", "last"] | int = Field(
        "middle", description="Which frame's caption becomes visual_caption (or a frame index)."
    )
    dedup_frames: bool = Field(True, description="Caption identical frames (equal pixels) once.")
    decoder: Literal["generate", "fast"] = Field(
        "generate",
        description=(
            "generate: transformers' generate(). fast: the fixed-shape decode loop of "
            "stages/caption/fast.py (same tokens, checked on CPU; its GPU speed is not measured yet)."
        ),
    )
    static_cache: bool = Field(
        False, description="decoder=generate: static KV cache (fixed shapes; pads the last chunk)."
    )
    compile: bool | None = Field(
        None,
        description=(
            "torch.compile the decode step. decoder=fast: as a CUDA graph (mode reduce-overhead); "
            "default on with CUDA, off on CPU. decoder=generate: needs static_cache; default off."
        ),
    )
    # Quality signal (issue 18): a CLIP score of each frame caption against its keyframe; the
    # scorer itself (model, device, batch) is the scoring: section, shared with stage 4.
    score: bool = Field(
        True, description="Score every frame caption against its keyframe with CLIP (scoring.clip_model)."
    )
    simulate_oom_above: int | None = Field(
        None,
        gt=0,
        description="Testing hook: raise CUDA out-of-memory for generate() chunks larger than this.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return moved_keys(data, "caption", MOVED)

    @model_validator(mode="after")
    def _decoder_options(self) -> CaptionConfig:
        if self.decoder == "generate" and self.compile and not self.static_cache:
            raise ValueError("compile: true needs static_cache: true (a dynamic cache is not compiled)")
        if self.decoder == "fast" and self.static_cache:
            raise ValueError("static_cache is for decoder: generate (decoder: fast always uses one)")
        if self.decoder == "fast" and self.device_map:
            raise ValueError("decoder: fast runs the model on one device; it cannot use device_map")
        return self
