"""A realistic run: stages 0-6 of the real pipeline on 42 generated clips (train, val and test),
with something going wrong at every stage, as it does at scale.

Every stage runs as `avcaps run N` in its own process: yt-dlp downloads from the local media server
(with a 404, a private video, a 429 that clears), PyAV decodes (a clip truncated on disk after its
download, a black clip, a silent one), the tiny BLIP-2 captions (a keyframe deleted after stage 2),
a tiny chat model merges through the quality gate (a clip whose merge fails it), Label Studio takes
the reviews (one edited, one rejected), and the export pulls them. Each failure must stay with its
own clip: every stage finishes, the export holds exactly the clips that are ok all the way, its
card counts the failures by reason as the ledgers do, and a rerun finds nothing to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.selection import stage_ledger
from pipeline.stage import Stage
from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage
from stages.export.stage import HF_SPLITS
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from stages.merge.stage import MergeStage
from stages.review.client import LabelStudio
from stages.review.labeling import text_result, verdict_result
from stages.review.push import ReviewStage
from stages.review.server import LabelStudioServer
from standins.media import YTDLP_PLUGINS, MediaServer, make_clip
from standins.review_run import TEST_CREDS as CREDS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ITEM_STAGES: list[type[Stage]] = [DownloadStage, KeyframesStage, CaptionStage, MergeStage, ReviewStage]
LEDGER_STAGES: list[type[Stage]] = [ManifestStage, *ITEM_STAGES]

# What happens to each kind of clip: (stage folder, reason) of its failure, or None if it stays ok.
FATE: dict[str, tuple[str, str] | None] = {
    "okay": None,
    "e404": ("01-download", "http_404"),  # the source is gone
    "priv": ("01-download", "private"),  # YouTube's "Private video" text
    "r429": None,  # rate limited once, then downloaded on the retry
    "trnc": ("02-keyframes", "corrupt_video"),  # its file is cut short on disk after stage 1
    "blck": None,  # a black picture: flagged, not failed
    "slnt": None,  # digital silence: flagged, not failed
    "nofr": ("03-caption", "missing_frame"),  # its keyframe is deleted after stage 2
    "gate": ("04-merge", "gate_missing_audio"),  # the merge drops the sound it should keep
    "rjct": None,  # rejected in review: ok in every ledger, never exported
    "edit": None,  # edited in review: exported with the edited captions
}
# Clips per split and kind: 20 train, 8 val, 14 test (only test is merged and reviewed).
PLAN: dict[str, dict[str, int]] = {
    "train": {"okay": 17, "e404": 1, "trnc": 1, "slnt": 1},
    "val": {"okay": 6, "priv": 1, "nofr": 1},
    "test": {"okay": 9, "r429": 1, "blck": 1, "gate": 1, "rjct": 1, "edit": 1},
}
# The stand-in LLM only ever says "dog" (see dog_chat_model): captions about a dog keep enough of
# their content words in its answer to pass the gate, a cat's do not.
DOG_CAPTIONS = ["A dog barks", "Dogs bark in the distance"]
CAT_CAPTIONS = ["A cat meows", "A dog barks"]
EDIT = "A dog barks twice on a sunny lawn"


@dataclass(frozen=True)
class Clip:
    split: str
    kind: str
    n: int

    @property
    def youtube_id(self) -> str:
        return f"{self.split[:2]}-{self.kind}-{self.n:03d}"  # 11 characters, as YouTube's

    @property
    def start_s(self) -> int:
        # Middle frames fall on source seconds 6-9: gray levels far from black, unless made black.
        return 1 + self.n % 4

    @property
    def clip_id(self) -> str:
        return f"{self.youtube_id}_{self.start_s * 1000}_{(self.start_s + 10) * 1000}"

    @property
    def captions(self) -> list[str]:
        if self.split == "train":
            return ["A dog barks while a man speaks"]  # AudioCaps train: one caption per clip
        return CAT_CAPTIONS if self.kind == "gate" else DOG_CAPTIONS


CLIPS = [Clip(split, kind, n) for split, kinds in PLAN.items() for kind, k in kinds.items() for n in range(k)]
BY_ID = {c.clip_id: c for c in CLIPS}
ONE = {c.kind: c.clip_id for c in CLIPS if c.kind != "okay"}  # the one clip of each other kind
# The media server's fault per kind: (mode, served how many times; None: for ever).
FAULTS = {"e404": ("404", None), "priv": ("private", None), "r429": ("429", 1)}


def write_inputs(folder: Path) -> Path:
    """AudioCaps-style CSVs (one row per caption) and the stand-in source videos; returns the
    CSV folder."""
    csv_dir = folder / "csv"
    csv_dir.mkdir(parents=True)
    audiocap_id = 0
    for split in PLAN:
        lines = ["audiocap_id,youtube_id,start_time,caption"]
        for clip in (c for c in CLIPS if c.split == split):
            for caption in clip.captions:
                audiocap_id += 1
                lines.append(f"{audiocap_id},{clip.youtube_id},{clip.start_s},{caption}")
        (csv_dir / f"{split}.csv").write_text("\n".join(lines) + "\n")

    def source(clip: Clip) -> None:
        made = make_clip(
            folder / "sources" / f".tmp-{clip.youtube_id}",
            clip.start_s + 12,
            black=clip.kind == "blck",
            tone_hz=0 if clip.kind == "slnt" else 440,
        )
        os.replace(made, folder / "sources" / f"{clip.youtube_id}.mp4")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(source, CLIPS))
    return csv_dir


def write_config(path: Path, **sections: Any) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def avcaps_run(stage: int, config: Path, env: dict[str, str]) -> str:
    """`avcaps run STAGE` in a process of its own, as a user runs it; it must exit 0."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(stage), "--config", str(config), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stage {stage} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def latest(cls: type[Stage], workdir: Path) -> pd.DataFrame:
    return stage_ledger(cls, workdir).latest()


def reasons(state: pd.DataFrame, ids: set[str]) -> dict[str, int]:
    """Failure counts by reason among ``ids`` in a stage's current rows."""
    rows = state[state.index.isin(ids) & (state["status"] != "ok")]
    return dict(sorted(Counter(rows["reason"]).items()))


def export_rows(workdir: Path, variant: str) -> dict[str, pd.DataFrame]:
    """The exported rows of one config, per HF split, indexed by clip_id."""
    out = {}
    for split in HF_SPLITS.values():
        paths = sorted((workdir / "export" / "data" / variant).glob(f"{split}-*.parquet"))
        rows = pd.concat(pd.read_parquet(p) for p in paths) if paths else pd.DataFrame({"clip_id": []})
        out[split] = rows.set_index("clip_id", drop=False)
    return out


def snapshot(workdir: Path) -> tuple[dict[str, int], dict[str, bytes]]:
    """Rows ever committed per ledger, and the export's bytes per file."""
    rows = {cls.dirname(): len(stage_ledger(cls, workdir).read_all()) for cls in LEDGER_STAGES}
    export = workdir / "export"
    files = {p.relative_to(export).as_posix(): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    return rows, files


def run_pipeline(config: Path, env: dict[str, str], workdir: Path, ls_url: str) -> None:
    """Stages 0-6, with the damage done on disk between stages and the annotators' work before 6."""
    for stage in (0, 1):
        avcaps_run(stage, config, env)
    # A clip downloaded fine, then cut short on disk (a full disk, a killed copy).
    video = workdir / latest(DownloadStage, workdir).loc[ONE["trnc"], "video_path"]
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    avcaps_run(2, config, env)
    # A keyframe lost after stage 2 (a cleanup of the media folder).
    frames = latest(KeyframesStage, workdir).loc[ONE["nofr"]]
    (workdir / frames["frame_paths"][frames["middle_frame"]]).unlink()
    for stage in (3, 4, 5):
        avcaps_run(stage, config, env)
    # Annotators accept every pushed merge but two: one edited, one rejected.
    merges = latest(MergeStage, workdir)
    client = LabelStudio(ls_url, CREDS.api_key)
    for cid, task_id in latest(ReviewStage, workdir)["ls_task_id"].items():
        kind = BY_ID[cid].kind
        if kind == "edit":
            edit = [EDIT] * len(merges.loc[cid, "merged_captions"])
            result = [verdict_result("edited"), text_result(edit)]
        else:
            result = [verdict_result("rejected" if kind == "rjct" else "accept")]
        client.create_annotation(int(task_id), result)
    avcaps_run(6, config, env)  # pulls the reviews first


def check_fates(states: dict[str, pd.DataFrame]) -> None:
    """Every clip failed where it was meant to, for the reason meant, and nowhere else (an
    ``unexpected:TypeError`` for every clip of stage 3 was the bug this test guards against)."""
    fates: dict[str, tuple[str, str] | None] = {}
    for cid in BY_ID:
        failed = [
            (d, s.loc[cid, "reason"])
            for d, s in states.items()
            if cid in s.index and s.loc[cid, "status"] != "ok"
        ]
        fates[cid] = failed[0] if failed else None
    assert fates == {c.clip_id: FATE[c.kind] for c in CLIPS}
    download = states["01-download"]
    assert "Private video" in download.loc[ONE["priv"], "message"]  # YouTube's words reach the ledger
    assert download.loc[ONE["r429"], "attempts"] == 2  # the 429 cleared on the retry
    assert len(states["04-merge"]) == len(states["05-review"]) + 1  # test only, all but the gate's clip


def expected_export(workdir: Path, states: dict[str, pd.DataFrame]) -> dict[str, set[str]]:
    """The clips the export must hold per HF split, from the ledgers: ok in stages 1-3, and for
    test also merged and accepted (or edited) in review."""
    ok = {d: set(s.index[s["status"] == "ok"]) for d, s in states.items()}
    reviews = pd.read_parquet(workdir / "05-review" / "reviews.parquet").set_index("clip_id")
    accepted = set(reviews.index[reviews["verdict"].isin(["accept", "edited"])])
    clips = latest(ManifestStage, workdir)
    expected = {}
    for split, hf_split in HF_SPLITS.items():
        ids = (
            set(clips.index[clips["split"] == split])
            & ok["01-download"]
            & ok["02-keyframes"]
            & ok["03-caption"]
        )
        expected[hf_split] = ids & ok["04-merge"] & accepted if split == "test" else ids
    return expected


def check_card(workdir: Path, states: dict[str, pd.DataFrame], expected: dict[str, set[str]]) -> None:
    """statistics.json and the card's availability table count the failures by reason per split
    as the ledgers do (each stage among the clips that reached it)."""
    stats = json.loads((workdir / "export" / "statistics.json").read_text())
    download_report = json.loads((workdir / "01-download" / "stats.json").read_text())["summary"]
    card = (workdir / "export" / "README.md").read_text().splitlines()
    clips = latest(ManifestStage, workdir)
    for split, hf_split in HF_SPLITS.items():
        ids = set(clips.index[clips["split"] == split])
        want: dict[str, Any] = {"clips": len(ids), "exported": len(expected[hf_split])}
        for dirname in ("01-download", "02-keyframes", "03-caption", "04-merge"):
            if dirname == "04-merge" and split != "test":
                break
            state = states[dirname]
            want[f"failed_{dirname[3:]}"] = reasons(state, ids)
            ids = ids & set(state.index[state["status"] == "ok"])
        avail = stats["availability"][hf_split]
        assert {k: avail[k] for k in want} == want, hf_split
        assert download_report["availability"][split]["permanent"] == want["failed_download"]
        # The card's row: split | clips | download failures | later failures (stage:reason) | exported
        head, tail = f"| {hf_split} | {want['clips']} |", f"| {want['exported']} |"
        (row,) = (r for r in card if r.startswith(head) and r.endswith(tail) and r.count("|") == 6)
        for key, counts in want.items():
            if key.startswith("failed_"):
                stage = "" if key == "failed_download" else key.removeprefix("failed_") + ":"
                assert all(f"{stage}{r} {n}" in row for r, n in counts.items()), (key, row)
    assert stats["review"] == {"accept": 11, "edited": 1, "rejected": 1, "unreviewed": 0}


def test_realistic_run(
    ls_server: LabelStudioServer,
    ls_root: Path,
    tiny_blip2: Path,
    tiny_clip: Path,
    tiny_clap: Path,
    dog_chat_model: Path,
    tmp_path: Path,
) -> None:
    workdir = ls_root / "realistic-run"  # under the server's document root, as `review server` sets it
    csv_dir = write_inputs(tmp_path)
    # The yt-dlp plugin standing in for YouTube's extractor is on the path of every stage process.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(YTDLP_PLUGINS)]),
        "LABEL_STUDIO_API_KEY": CREDS.api_key,
    }
    env.pop("AVCAPS_APP", None)

    with MediaServer(tmp_path / "sources") as media:
        for kind, (mode, times) in FAULTS.items():
            media.set_fault(f"{BY_ID[ONE[kind]].youtube_id}.mp4", mode, times)
        config = write_config(
            tmp_path / "run.yaml",
            workdir=str(workdir),
            manifest={"csv_dir": str(csv_dir), "splits": {s: f"{s}.csv" for s in PLAN}, "checksums": None},
            download={
                "url_template": media.url_template(),
                "max_attempts": 3,
                "backoff_s": 0.2,
                "read_timeout_s": 10,
                "socket_timeout_s": 10,
            },
            caption={
                "model": str(tiny_blip2),
                "num_beams": 1,
                "max_new_tokens": 8,
                "batch_size": 16,
            },
            merge={
                "backend": "transformers",
                "model": str(dog_chat_model),
                "device": "cpu",
                "reasoning_effort": None,
                "max_new_tokens": 24,
                # The visual caption is the random BLIP-2's: no LLM answer could keep its words.
                "min_visual_overlap": 0.0,
                # "dog dog ..." keeps 1 of the 3 content words of "Dogs bark in the distance".
                "min_audio_overlap": 0.3,
                "max_quality_retries": 1,
            },
            review={"url": ls_server.url, "document_root": str(ls_root)},
            scoring={"clip_model": str(tiny_clip), "clap_model": str(tiny_clap)},
        )
        run_pipeline(config, env, workdir, ls_server.url)

        states = {cls.dirname(): latest(cls, workdir) for cls in ITEM_STAGES}
        check_fates(states)
        expected = expected_export(workdir, states)
        assert {s: len(ids) for s, ids in expected.items()} == {"train": 18, "validation": 6, "test": 12}
        for variant in json.loads((workdir / "export" / "statistics.json").read_text())["variants"]:
            rows = export_rows(workdir, variant)
            assert {s: set(r.index) for s, r in rows.items()} == expected, variant
        rows = export_rows(workdir, "and")
        assert dict(Counter(rows["test"]["review_verdict"])) == {"accept": 11, "edited": 1}
        assert list(rows["test"].loc[ONE["edit"], "captions"]) == [EDIT, EDIT]
        # Quality flags reach the export, on their clips only.
        everything = pd.concat(rows.values())
        assert set(everything.index[everything["flag_black_frame"]]) == {ONE["blck"]}
        assert set(everything.index[everything["flag_silent"]]) == {ONE["slnt"]}
        check_card(workdir, states, expected)

        # A rerun of stages 1-6 does nothing new: no ledger row, and a byte-identical export.
        before = snapshot(workdir)
        for stage in (1, 2, 3, 4, 5):
            assert "nothing to do" in avcaps_run(stage, config, env), stage
        avcaps_run(6, config, env)
        assert snapshot(workdir) == before
