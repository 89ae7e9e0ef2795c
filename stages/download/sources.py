"""Where stage 1 takes each clip from: ``download.sources``, an ordered list; per clip the first
source holding a valid copy wins.

Kinds (each a config model below):

- ``folder``: a directory tree and a file-name ``pattern``;
- ``tar``: WebDataset-style tar shards (a glob or brace list) and a member-name ``pattern``;
- ``hf``: a Hugging Face dataset (a Hub id, or a local folder written by ``datasets``), the column
  holding the media and the columns that identify the clip;
- ``youtube``: yt-dlp on ``url_template`` (what a run without ``sources`` does).

A pattern is a file name with placeholders (:data:`PLACEHOLDERS`) and ``*`` (any characters but
``/``, e.g. any extension). A pattern that names the start (``{start_time}``, ``{start_ms}``,
``{clip_id}``) or an ``{audiocap_id}`` holds **pre-cut clips**; one that names only
``{youtube_id}`` holds **full-length videos** (or audio), cut here. ``streams`` says what a source
gives: ``both`` (the default: the picture, and the sound when the file has it), ``video`` (the
picture only) or ``audio`` (an audio-only source: wav/flac/m4a...).

This module holds the settings and the pattern rules only (no I/O): :mod:`stages.download.index`
indexes a source, :mod:`stages.download.local` takes a clip from it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import AbortRun

#: Placeholder -> the regular expression its text must match.
PLACEHOLDERS: dict[str, str] = {
    "youtube_id": r"[A-Za-z0-9_-]{11}",
    "start_time": r"[0-9]+",
    "start_ms": r"[0-9]+",
    "end_ms": r"[0-9]+",
    "clip_id": r"[A-Za-z0-9_-]{11}_[0-9]+_[0-9]+",
    "audiocap_id": r"[0-9]+",
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
Streams = Literal["both", "video", "audio"]


class _Source(StrictModel):
    kind: str  # each kind's model narrows it to its Literal (the union's discriminator)
    name: str | None = Field(
        None,
        description="A short name for the ledger, status and card (letters, digits, . _ -); default: "
        "the kind and the last part of its path.",
    )
    streams: Streams = Field(
        "both",
        description="What this source gives: both (the picture, and the sound when the file has it), "
        "video (the picture only), audio (an audio-only source).",
    )

    def default_name(self) -> str:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """``kind:name``, as the ledger's ``video_source``/``audio_source`` and status write it."""
        return f"{self.kind}:{self.name or self.default_name()}"


class FolderSource(_Source):
    kind: Literal["folder"]
    path: str = Field(description="A directory tree holding the files.")
    pattern: str = Field(
        description="File name with placeholders, e.g. 'Y{youtube_id}.mp4' (full-length videos) or "
        "'{youtube_id}_{start_ms}_{end_ms}.*' (pre-cut clips); with a '/', matched against the path "
        "below `path`."
    )
    place: Literal["link", "copy"] = Field(
        "copy",
        description="How a pre-cut file taken as it is reaches media/video/: copy, or link (a hard "
        "link on the same filesystem, else a symbolic link to the source file).",
    )

    def default_name(self) -> str:
        return _safe_name(self.path)


class TarSource(_Source):
    kind: Literal["tar"]
    path: str = Field(
        description="Shards: a glob ('/data/shards/*.tar') or a brace list ('/data/shard-{000..127}.tar'); "
        "uncompressed tar (members are read by offset)."
    )
    pattern: str = Field(description="Member name with placeholders, e.g. '{clip_id}.mp4'.")

    def default_name(self) -> str:
        return _safe_name(os.path.dirname(self.path) or "shards")  # the shards' folder


class HfSource(_Source):
    kind: Literal["hf"]
    dataset: str = Field(description="A Hub dataset id, or a local folder written by `datasets`.")
    split: str | None = Field(None, description="The dataset's split (needed when it has several).")
    config_name: str | None = Field(None, description="The dataset's config (Hub datasets).")
    revision: str | None = Field(None, description="Hub revision (a tag or commit).")
    media_column: str = Field("video", description="The column holding the media: bytes, a path, or both.")
    columns: dict[str, str] = Field(
        description="What identifies the clip: placeholder -> column, e.g. {youtube_id: ytid, "
        "start_time: start} (pre-cut) or {youtube_id: ytid} (full-length)."
    )

    def default_name(self) -> str:
        return _safe_name(self.dataset)


class YoutubeSource(_Source):
    kind: Literal["youtube"]
    url_template: str | None = Field(
        None, description="Source URL with {id}; default: download.url_template."
    )

    def default_name(self) -> str:
        return "youtube"


Source = Annotated[FolderSource | TarSource | HfSource | YoutubeSource, Field(discriminator="kind")]
LOCAL_KINDS = ("folder", "tar", "hf")


def _safe_name(path: str) -> str:
    """A source name from a path or id: its last part, reduced to the characters names allow."""
    last = re.split(r"[\\/]+", path.rstrip("/\\"))[-1] or "source"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")[:48] or "source"


# -- patterns -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """A compiled pattern: the regular expression and what its matches identify."""

    text: str
    regex: re.Pattern[str]
    fields: tuple[str, ...]
    #: ``clip`` (a pre-cut clip by youtube id and start, or clip id), ``audiocap`` (a pre-cut clip by
    #: an audiocap id), ``video`` (a full-length video by youtube id, cut here)
    holds: Literal["clip", "audiocap", "video"]
    on_path: bool  # matched against the path below the root ('/' in the pattern), else the name

    @property
    def precut(self) -> bool:
        return self.holds != "video"

    def key(self, name: str) -> str | None:
        """The index key of a file or member name, or None when the pattern does not match it."""
        m = self.regex.fullmatch(name if self.on_path else name.rsplit("/", 1)[-1])
        return None if m is None else key_of(self.holds, m.groupdict())


def identify(fields: set[str], what: str) -> Literal["clip", "audiocap", "video"]:
    """What a set of placeholders identifies, or AbortRun when it can identify no clip."""
    if "clip_id" in fields or ("youtube_id" in fields and fields & {"start_time", "start_ms"}):
        return "clip"
    if "audiocap_id" in fields:
        return "audiocap"
    if "youtube_id" in fields:
        if "end_ms" in fields:
            raise AbortRun(f"{what} names {{end_ms}} but not the start ({{start_time}} or {{start_ms}})")
        return "video"
    raise AbortRun(
        f"{what} can never match a clip: it names no {{clip_id}}, {{youtube_id}} or {{audiocap_id}}"
    )


def compile_pattern(text: str, what: str) -> Pattern:
    """``text`` as a :class:`Pattern`; AbortRun (one line, naming ``what``) for an unknown
    placeholder, a placeholder given twice, stray braces, or a pattern that identifies no clip."""
    known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    if not text or text.startswith("/") or ".." in text.split("/"):
        raise AbortRun(f"{what}: pattern {text!r} must be a relative name (no leading '/', no '..')")
    parts: list[str] = []
    fields: list[str] = []
    for token in re.split(r"(\{[^{}]*\}|\*)", text):
        if token == "*":
            parts.append(r"[^/]*")
        elif token.startswith("{") and token.endswith("}"):
            field = token[1:-1]
            if field not in PLACEHOLDERS:
                raise AbortRun(f"{what}: pattern {text!r} has an unknown placeholder {token}; known: {known}")
            if field in fields:
                raise AbortRun(f"{what}: pattern {text!r} names {token} twice")
            fields.append(field)
            parts.append(f"(?P<{field}>{PLACEHOLDERS[field]})")
        elif "{" in token or "}" in token:
            raise AbortRun(f"{what}: pattern {text!r} has a stray brace; placeholders are {known}")
        else:
            parts.append(re.escape(token))
    holds = identify(set(fields), f"{what}: pattern {text!r}")
    return Pattern(text, re.compile("".join(parts)), tuple(fields), holds, "/" in text)


def key_of(holds: str, values: dict[str, Any]) -> str | None:
    """The index key of one file's placeholder values (strings as matched, or a dataset's cells):
    a clip id for pre-cut clips, ``ac:<id>`` by audiocap id, ``yt:<id>`` for full-length videos.
    None when the values cannot name a clip (e.g. a malformed id in a dataset column)."""

    def text(name: str) -> str | None:
        value = values.get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out = str(value).strip()
        return out if re.fullmatch(PLACEHOLDERS[name], out) else None

    if holds == "video":
        yt = text("youtube_id")
        return None if yt is None else f"yt:{yt}"
    if holds == "audiocap":
        ac = text("audiocap_id")
        return None if ac is None else f"ac:{int(ac)}"
    if "clip_id" in values:
        return text("clip_id")
    yt, start_ms = text("youtube_id"), text("start_ms")
    if start_ms is None and (start_s := text("start_time")) is not None:
        start_ms = str(int(start_s) * 1000)
    if yt is None or start_ms is None:
        return None
    end_ms = text("end_ms")
    # A clip lasts 10 s unless the name says otherwise; a clip id of another length names another clip.
    return f"{yt}_{int(start_ms)}_{int(end_ms) if end_ms is not None else int(start_ms) + 10_000}"


def clip_keys(holds: str, item: dict[str, Any], clip_id: str) -> list[str]:
    """The index keys under which a source of this kind would hold a clip (the clip table's row)."""
    if holds == "video":
        return [f"yt:{item['youtube_id']}"]
    if holds == "audiocap":
        return [f"ac:{int(a)}" for a in (item.get("audiocap_ids") or [])]
    return [clip_id]


def source_pattern(source: Any, what: str) -> Pattern:
    """The pattern of a folder or tar source, or the identity of an hf source's columns."""
    if isinstance(source, HfSource):
        unknown = sorted(set(source.columns) - set(PLACEHOLDERS))
        if unknown:
            known = ", ".join(PLACEHOLDERS)
            raise AbortRun(
                f"{what}: columns names unknown placeholder(s) {', '.join(unknown)}; known: {known}"
            )
        holds = identify(set(source.columns), f"{what}: columns {source.columns}")
        return Pattern("", re.compile(""), tuple(source.columns), holds, False)
    return compile_pattern(source.pattern, what)


def check_sources(sources: list[Any]) -> None:
    """Names unique and well-formed, patterns valid: AbortRun with one line otherwise."""
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        name = src.name or src.default_name()
        what = f"download.sources[{i}] ({src.kind}:{name})"
        if not NAME.fullmatch(name):
            raise AbortRun(f"{what}: name {name!r} must be 1-64 of letters, digits, '.', '_', '-'")
        if name in seen:
            raise AbortRun(
                f"{what}: the name {name!r} is taken by download.sources[{seen[name]}]; give each source "
                "its own `name`"
            )
        seen[name] = i
        if src.kind == "youtube":
            if src.streams != "both":
                raise AbortRun(f"{what}: a youtube source gives both streams (streams: both)")
            continue
        source_pattern(src, what)
