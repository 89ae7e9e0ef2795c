"""A setting changed mid-project (issue 13): stale results never ship.

A full run (stages 0-6, real stand-ins: yt-dlp from the local media server, the tiny BLIP-2, the
"dog" chat model, Label Studio) is made; then a caption setting changes. Status must show stages 3
to 6 stale with counts; the export must refuse; rerunning 3-5 updates the review tasks and makes
the earlier annotations outdated (counted, not used); after a new review the export must equal, byte
for byte, that of a fresh run made with the new setting from the start. A forced merge against a
server that is down must leave every ok merge current.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.selection import stage_ledger
from stages.merge.stage import MergeStage
from stages.review.client import LabelStudio
from stages.review.labeling import verdict_result
from stages.review.push import ReviewStage
from stages.review.server import LabelStudioServer
from standins.media import MediaServer, make_clip
from standins.review_run import TEST_CREDS as CREDS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLIPS = {"train": [f"tr-okay-{i:03d}" for i in range(3)], "test": [f"te-okay-{i:03d}" for i in range(3)]}


def write_inputs(folder: Path) -> Path:
    csv_dir = folder / "csv"
    csv_dir.mkdir(parents=True)
    n = 0
    for split, ids in CLIPS.items():
        lines = ["audiocap_id,youtube_id,start_time,caption"]
        for yt in ids:
            for caption in ["A dog barks"] if split == "train" else ["A dog barks", "Dogs bark"]:
                n += 1
                lines.append(f"{n},{yt},1,{caption}")
        (csv_dir / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for yt in ids:
            os.replace(make_clip(folder / "sources" / f".tmp-{yt}", 13), folder / "sources" / f"{yt}.mp4")
    return csv_dir


def avcaps(*args: str, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, (
            f"avcaps {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return proc


def status(config: Path, env: dict[str, str], *sets: str) -> dict[str, dict[str, Any]]:
    out = avcaps("status", "--config", str(config), "--json", *sets, env=env).stdout
    return {s["stage"]: s for s in json.loads(out)["stages"]}


def annotate_all(workdir: Path, url: str) -> None:
    client = LabelStudio(url, CREDS.api_key)
    for task_id in stage_ledger(ReviewStage, workdir).latest()["ls_task_id"]:
        client.create_annotation(int(task_id), [verdict_result("accept")])


def export_files(workdir: Path) -> dict[str, bytes]:
    folder = workdir / "export"
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_changed_caption_setting_is_followed_through_to_the_export(
    ls_server: LabelStudioServer,
    ls_root: Path,
    tiny_blip2: Path,
    dog_chat_model: Path,
    tmp_path: Path,
    tiny_clip: Path,
    tiny_clap: Path,
) -> None:
    csv_dir = write_inputs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABEL_STUDIO_API_KEY": CREDS.api_key}
    env.pop("AVCAPS_APP", None)
    with MediaServer(tmp_path / "sources") as media:

        def config(name: str, max_new_tokens: int) -> Path:
            path = tmp_path / f"{name}-{max_new_tokens}.yaml"
            sections = {
                "workdir": str(ls_root / name),
                "manifest": {
                    "csv_dir": str(csv_dir),
                    "splits": {s: f"{s}.csv" for s in CLIPS},
                    "checksums": None,
                },
                "download": {"url_template": media.url_template(), "backoff_s": 0.2},
                "caption": {
                    "model": str(tiny_blip2),
                    "num_beams": 1,
                    "max_new_tokens": max_new_tokens,
                },
                "merge": {
                    "backend": "transformers",
                    "model": str(dog_chat_model),
                    "device": "cpu",
                    "reasoning_effort": None,
                    "max_new_tokens": 24,
                    "min_visual_overlap": 0.0,
                    "max_quality_retries": 1,
                },
                "review": {"url": ls_server.url, "document_root": str(ls_root)},
                "scoring": {"clip_model": str(tiny_clip), "clap_model": str(tiny_clap)},
            }
            path.write_text(yaml.safe_dump(sections, sort_keys=False))
            return path

        first, changed = config("changed", 8), config("changed", 5)  # one run folder, two settings
        for stage in range(6):
            avcaps("run", str(stage), "--config", str(first), "--no-progress", env=env)
        workdir = ls_root / "changed"
        annotate_all(workdir, ls_server.url)
        avcaps("run", "6", "--config", str(first), env=env)
        st = status(first, env)
        assert [st[s]["ok"] for s in ("03-caption", "04-merge", "05-review")] == [6, 3, 3]
        assert all(
            st[s]["stale"] == 0
            for s in ("01-download", "02-keyframes", "03-caption", "04-merge", "05-review")
        )
        assert st["06-export"]["stale"] == 0

        # A forced merge against a server that is down changes nothing: every ok merge stays current.
        merges = stage_ledger(MergeStage, workdir).latest()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        down = avcaps(
            "run",
            "4",
            "--config",
            str(first),
            "--force",
            "--set",
            "merge.backend=openai",
            "--set",
            f"merge.base_url={dead}",
            env=env,
            ok=False,
        )
        assert down.returncode == 2 and dead in down.stderr
        assert (
            stage_ledger(MergeStage, workdir)
            .latest()[["status", "merged_captions"]]
            .equals(merges[["status", "merged_captions"]])
        )
        assert status(first, env)["04-merge"]["stale"] == 0

        # The caption setting changes: stage 3 is stale, with counts, and the merges made from its
        # rows wait for it (said, with the command); 1 and 2 are not stale; every exported clip is.
        st = status(changed, env)
        assert [st[s]["stale"] for s in ("01-download", "02-keyframes")] == [0, 0]
        assert st["03-caption"]["stale"] == 6 and st["04-merge"]["stale"] == 0
        assert st["04-merge"]["waiting_on_stale"] == {"03-caption": 3}
        assert st["06-export"]["stale"] == 6
        waits = avcaps("run", "4", "--config", str(changed), "--no-progress", env=env).stdout
        assert "3 wait for stage 03-caption" in waits and "avcaps run 3" in waits
        # The same in a forced run, its dry run and the status table: never a bare "nothing to do".
        forced = avcaps("run", "4", "--force", "--config", str(changed), "--no-progress", env=env).stdout
        dry = avcaps("run", "4", "--dry-run", "2", "--config", str(changed), env=env).stdout
        table = avcaps("status", "--config", str(changed), env=env).stdout
        for said in (forced, dry, table):
            assert "3 wait for stage 03-caption" in said and "avcaps run 3" in said, said
        refused = avcaps("run", "6", "--config", str(changed), env=env, ok=False)
        assert refused.returncode == 2 and "03-caption" in refused.stderr and "stale" in refused.stderr

        avcaps("run", "3", "--config", str(changed), "--no-progress", env=env)
        # The new captions are not those the merges were made from: now the merges are stale.
        assert status(changed, env)["04-merge"]["stale"] == 3
        for stage in (4, 5):
            avcaps("run", str(stage), "--config", str(changed), "--no-progress", env=env)
        st = status(changed, env)
        assert all(st[s]["stale"] == 0 for s in ("03-caption", "04-merge", "05-review"))
        # The review tasks show the new merges; the annotations of the old ones are outdated.
        client = LabelStudio(ls_server.url, CREDS.api_key)
        new = stage_ledger(MergeStage, workdir).latest()
        for cid, row in stage_ledger(ReviewStage, workdir).latest().iterrows():
            task = client.task(int(row["ls_task_id"]))
            assert task["data"]["merged_captions"] == list(new.loc[cid, "merged_captions"])
            assert len(row["ls_outdated_annotations"]) == 1
        review = json.loads(avcaps("review", "status", "--config", str(changed), "--json", env=env).stdout)
        assert review["outdated_annotations"] == 3
        # The old reviews are no reviews of the new merges: the export waits for new ones.
        unreviewed = avcaps("run", "6", "--config", str(changed), env=env, ok=False)
        assert unreviewed.returncode == 2 and "05-review" in unreviewed.stderr
        annotate_all(workdir, ls_server.url)
        avcaps("run", "6", "--config", str(changed), env=env)
        assert status(changed, env)["06-export"]["stale"] == 0

        # A fresh run made with the new setting from the start exports the same bytes.
        fresh = config("fresh", 5)
        for stage in range(6):
            avcaps("run", str(stage), "--config", str(fresh), "--no-progress", env=env)
        annotate_all(ls_root / "fresh", ls_server.url)
        avcaps("run", "6", "--config", str(fresh), env=env)
        assert export_files(workdir) == export_files(ls_root / "fresh")
