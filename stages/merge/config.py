"""Stage 4's section of the run manifest (``merge:``): backend, sampling, quality gate, batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StageConfig
from stages.merge.gate import GateSettings
from stages.scoring import moved_keys

# Settings that moved to the shared scoring: section (issue 25): old manifests get a line saying where.
MOVED = {
    "clap_model": "scoring.clap_model",
    "clap_revision": "scoring.clap_revision",
    "clip_model": "scoring.clip_model",
    "clip_revision": "scoring.clip_revision",
    "score_device": "scoring.device",
    "score_dtype": "scoring.dtype",
    "score_batch_size": "scoring.batch_size",
    "score_local_files_only": "scoring.local_files_only",
}


class MergeConfig(StageConfig):
    batch_size: int = Field(
        64, gt=0, description="Clips per process() call: 320 requests per_caption, to fill concurrency."
    )
    splits: list[str] = Field(["test"], description="Splits to merge (the paper merges only test).")
    mode: Literal["per_caption", "all_in_one"] = Field(
        "per_caption", description="One merge per audio caption (5 refs on test/val) or one merge of all."
    )
    backend: Literal["openai", "vllm", "transformers"] = Field(
        "openai", description="openai: an OpenAI-compatible server (make llm-server); others in-process."
    )
    model: str = Field("openai/gpt-oss-20b", description="Served model name, or a local path in-process.")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible endpoint.")
    api_key_env: str | None = Field(
        "AVCAPS_LLM_API_KEY", description="Environment variable holding the API key, if the server wants one."
    )
    concurrency: int = Field(256, gt=0, description="Requests in flight (= llm-server --max-num-seqs).")
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0, description="Retries of one request on 429/5xx/connection errors.")
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry delay of a request; doubles.")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        "low", description="gpt-oss reasoning effort; null to not send it (models without it)."
    )
    structured_output: bool = Field(True, description='Ask for JSON {"caption": string} by schema.')
    max_new_tokens: int = Field(512, gt=0, description="Reasoning + answer tokens per request.")
    retry_max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="Budget of the one retry of an answer cut off at max_new_tokens (finish_reason "
        "length), then gate_truncated; default 4 x max_new_tokens.",
    )
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="Seed of the first try; try k uses seed + k.")
    device: str | None = Field(None, description="transformers backend: cuda / cpu (default: cuda if any).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm backend only.")
    vllm_engine_args: dict[str, Any] = Field(
        {}, description="vllm backend: extra vllm.LLM(...) arguments, e.g. {max_num_seqs: 256}."
    )
    prompt_file: Path | None = Field(
        None, description="Prompt YAML; default stages/merge/prompts/merge_v2.yaml."
    )
    max_words: int = Field(40, gt=0, description="Word budget of a merged caption.")
    max_chars: int = Field(400, gt=0, description="maxLength of the caption in the output JSON schema.")
    min_words: int = Field(3, ge=0)
    min_audio_overlap: float = Field(0.4, ge=0, le=1, description="Share of audio content words kept.")
    min_visual_overlap: float = Field(0.4, ge=0, le=1, description="Share of visual content words kept.")
    max_invented: float = Field(
        0.25, ge=0, le=1, description="Largest share of the merge's content words found in neither caption."
    )
    max_quality_retries: int = Field(2, ge=0, description="New-seed retries of an answer failing the gate.")

    # Quality signals (issue 18): CLAP (audio) and CLIP (middle keyframe) scores of each merge and
    # of what it merged, and the optional keep-the-best rule on the CLAP score.
    score: bool = Field(
        True, description="Score merges and source captions with CLAP and CLIP (the scoring: section)."
    )
    min_clap_percentile: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Off by default. A merge whose CLAP score ranks below this percentile of the "
        "run's merge CLAP scores is asked again with a new seed; the best-scoring answer is kept. "
        "It picks answers by score, so with it on the CLAP model (scoring.clap_model) and the "
        "clip's audio and keyframe are part of what a merge is made from: another CLAP model "
        "makes the merges stale, not only their scores.",
    )
    max_score_tries: int = Field(3, ge=1, description="Answers per merge the CLAP rule may ask for.")
    score_min_population: int = Field(
        200, ge=1, description="The CLAP rule fires only once this many merge scores are known."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return moved_keys(data, "merge", MOVED)

    @model_validator(mode="after")
    def _rule_needs_scores(self) -> MergeConfig:
        if self.min_clap_percentile is not None and not self.score:
            raise ValueError("merge.min_clap_percentile needs merge.score: true")
        return self

    @property
    def retry_budget(self) -> int:
        """max_tokens of the retry of a cut-off answer."""
        return self.retry_max_new_tokens or 4 * self.max_new_tokens


def gate_settings(cfg: MergeConfig) -> GateSettings:
    """The gate's thresholds from the ``merge`` config section."""
    return GateSettings(
        cfg.max_words, cfg.min_words, cfg.min_audio_overlap, cfg.min_visual_overlap, cfg.max_invented
    )
