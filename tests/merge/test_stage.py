"""Stage 4 ``process()`` with the in-process transformers backend on the tiny random chat model,
and the openai backend against closed / silent local ports: a server down at the start stops the
run in ``setup()`` (preflight); one that goes down after it fails its clips transiently."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.errors import AbortRun
from pipeline.stage import RunContext
from stages.config import RunConfig
from stages.merge.stage import DEFAULT_PROMPT, MergeStage, Prompt
from standins.llm import VISUAL
from standins.llm import make_merge_item as make_item

RELAXED = [  # a random-weight model writes word salad: only the structural checks can pass
    "merge.min_audio_overlap=0",
    "merge.min_visual_overlap=0",
    "merge.max_invented=1",
    "merge.min_words=1",
]
V1_PROMPT = DEFAULT_PROMPT.with_name("merge_v1.yaml")
# merge_v1.yaml's sha256 is on every row it made: the file must never change.
V1_SHA256 = "bc7a4f26e57c9c5a18187d4789c2caf416199aedddbe767148ffe44f6c80a8c8"


def stage_for(tmp_path: Path, overrides: list[str]) -> MergeStage:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("manifest: {splits: {test: test.csv}}\n")
    cfg = load_config(RunConfig, cfg_file, overrides)
    return MergeStage(RunContext(tmp_path / "run", cfg))


def tf_overrides(model: Path) -> list[str]:
    return [
        "merge.backend=transformers",
        f"merge.model={model}",
        "merge.reasoning_effort=null",
        "merge.max_new_tokens=24",
        "merge.device=cpu",
        "merge.score=false",  # these items carry no stage-2 media; tests/scores score merges
    ]


def run(stage: MergeStage, items: list[Any]) -> list[Any]:
    stage.setup()
    try:
        return stage.process(items)
    finally:
        stage.teardown()


def test_prompt_messages_and_hash(tmp_path: Path) -> None:
    p = Prompt.load(DEFAULT_PROMPT)
    assert p.version == "merge_v2"
    msgs = p.messages(["A dog barks"], VISUAL, 40)
    assert msgs[0]["role"] == "system" and "at most 40 words" in msgs[0]["content"]
    assert msgs[-1] == {"role": "user", "content": f"Audio caption: A dog barks\nVisual caption: {VISUAL}"}
    assert len(msgs) == 2 + 2 * len(p.few_shot_one)
    assert json.loads(msgs[2]["content"])["caption"]  # few-shot answers are in the JSON answer form
    assert all(m["content"].startswith("Audio caption: ") for m in msgs[1:-1:2])
    # The all-captions form gets its own examples, in its own form (numbered audio captions).
    many = p.messages(["a", "b"], VISUAL, 40)
    assert "1. a\n2. b" in many[-1]["content"]
    assert len(many) == 2 + 2 * len(p.few_shot_all) and p.few_shot_all
    assert all(
        m["content"].startswith("Audio captions (several") and "\n5. " in m["content"] for m in many[1:-1:2]
    )
    # Each form has an example whose picture does not show the sound source.
    raw = DEFAULT_PROMPT.read_text()
    assert raw.count("the picture does not show") >= 3  # the rule, and one example per form
    edited = tmp_path / "p.yaml"
    edited.write_bytes(DEFAULT_PROMPT.read_bytes() + b"# an edit\n")
    assert Prompt.load(edited).sha256 != p.sha256 and Prompt.load(edited).version == p.version


def test_prompt_v1_stays_loadable_and_unchanged() -> None:
    import hashlib

    assert hashlib.sha256(V1_PROMPT.read_bytes()).hexdigest() == V1_SHA256
    v1 = Prompt.load(V1_PROMPT)
    assert v1.version == "merge_v1" and v1.sha256 == V1_SHA256
    # As v1 built them: its one few-shot list, in the one-caption form, before either form.
    for audio in (["A dog barks"], ["a", "b"]):
        msgs = v1.messages(audio, VISUAL, 40)
        assert len(msgs) == 2 + 2 * 3
        assert all(m["content"].startswith("Audio caption: ") for m in msgs[1:-1:2])
    assert "1. a\n2. b" in v1.messages(["a", "b"], VISUAL, 40)[-1]["content"]


def test_a_bad_prompt_file_aborts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        DEFAULT_PROMPT.read_text().replace('caption: "A red sports car', 'text: "A red sports car')
    )
    with pytest.raises(AbortRun, match=r"bad\.yaml.*lacks \['caption'\]"):
        Prompt.load(bad)


@pytest.mark.slow
def test_random_model_fails_the_default_gate(tmp_path: Path, tiny_chat_model: Path) -> None:
    stage = stage_for(tmp_path, [*tf_overrides(tiny_chat_model), "merge.max_quality_retries=2"])
    (res,) = run(stage, [make_item("aaaaaaaaaaa_0_10000", split="train")])
    assert res.status == "failed_permanent" and res.reason.startswith("gate_"), res
    (merge,) = json.loads(res.outputs["merge_checks"])["merges"]
    # Retried with new seeds, then given up; every try is kept for audit.
    assert [t["seed"] for t in merge["tries"]] == [0, 1, 2] and not any(t["ok"] for t in merge["tries"])
    assert res.outputs["merge_raw"] == [merge["tries"][-1]["raw"]]
    assert res.outputs["merged_captions"] == [None] and res.outputs["merge_backend"] == "transformers"


@pytest.mark.slow
def test_transformers_backend_per_caption_and_all_in_one(tmp_path: Path, tiny_chat_model: Path) -> None:
    items = [make_item("aaaaaaaaaaa_0_10000"), make_item("bbbbbbbbbbb_0_10000", split="train")]
    stage = stage_for(tmp_path, [*tf_overrides(tiny_chat_model), *RELAXED])
    res = run(stage, items)
    assert [r.status for r in res] == ["ok", "ok"], res
    test, train = (r.outputs for r in res)
    assert len(test["merged_captions"]) == 5 and len(train["merged_captions"]) == 1
    assert all(isinstance(c, str) and c for c in test["merged_captions"])
    assert test["merge_mode"] == "per_caption" and test["merge_model"] == str(tiny_chat_model)
    assert test["merge_prompt_hash"] == Prompt.load(DEFAULT_PROMPT).sha256
    merges = json.loads(test["merge_checks"])["merges"]
    assert all(m["completion_tokens"] > 0 and m["prompt_tokens"] > 100 for m in merges)
    # The same batch with the same seeds gives the same answers: a rerun reproduces the rows.
    again = run(stage_for(tmp_path, [*tf_overrides(tiny_chat_model), *RELAXED]), items)
    assert again[0].outputs["merge_raw"] == test["merge_raw"]
    one = run(stage_for(tmp_path, [*tf_overrides(tiny_chat_model), *RELAXED, "merge.mode=all_in_one"]), items)
    assert [len(r.outputs["merged_captions"]) for r in one] == [1, 1]
    assert one[0].outputs["merge_mode"] == "all_in_one"


@pytest.mark.slow
def test_transformers_cut_off_answer_is_retried_once_then_truncated(
    tmp_path: Path, tiny_chat_model: Path, endless_chat_model: Path
) -> None:
    """A model that never ends its answer (random weights, no forced end token): one retry with
    the larger budget, then ``gate_truncated``; the stand-in that ends its answers stops."""
    flags = [
        *RELAXED,
        "merge.max_new_tokens=4",
        "merge.retry_max_new_tokens=6",
        "merge.max_quality_retries=0",
    ]
    (res,) = run(
        stage_for(tmp_path, [*tf_overrides(endless_chat_model), *flags]),
        [make_item("aaaaaaaaaaa_0_10000", split="train")],
    )
    assert res.status == "failed_permanent" and res.reason == "gate_truncated", res
    (merge,) = json.loads(res.outputs["merge_checks"])["merges"]
    assert [(t["seed"], t["max_tokens"], t["finish_reason"]) for t in merge["tries"]] == [
        (0, 4, "length"),
        (0, 6, "length"),
    ]
    assert merge["completion_tokens"] == 4 + 6
    (ok,) = run(
        stage_for(tmp_path, [*tf_overrides(tiny_chat_model), *flags]),
        [make_item("aaaaaaaaaaa_0_10000", split="train")],
    )
    tries = json.loads(ok.outputs["merge_checks"])["merges"][0]["tries"]
    assert [t["finish_reason"] for t in tries] == ["stop"], tries


def test_bad_input_fails_only_that_clip(tmp_path: Path, tiny_chat_model: Path) -> None:
    stage = stage_for(tmp_path, [*tf_overrides(tiny_chat_model), *RELAXED, "merge.max_new_tokens=4"])
    items = [make_item("aaaaaaaaaaa_0_10000", visual_caption=""), make_item("bbbbbbbbbbb_0_10000")]
    bad, good = run(stage, items)
    assert bad.status == "failed_permanent" and bad.reason == "bad_input" and "aaaaaaaaaaa" in bad.message
    assert good.clip_id == "bbbbbbbbbbb_0_10000" and good.status in ("ok", "failed_permanent")
    assert good.outputs["merge_raw"]


def test_selects_only_configured_splits(tmp_path: Path) -> None:
    import pandas as pd

    table = pd.DataFrame({"split": ["test", "train", "val"]})
    assert stage_for(tmp_path, []).select(table).tolist() == [True, False, False]
    assert stage_for(tmp_path, ["merge.splits=[train, test]"]).select(table).tolist() == [True, True, False]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung LLM server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def openai_overrides(port: int) -> list[str]:
    return [
        "merge.backend=openai",
        f"merge.base_url=http://127.0.0.1:{port}/v1",
        "merge.retries=2",
        "merge.retry_backoff_s=0.01",
        "merge.request_timeout_s=0.3",
        "merge.connect_timeout_s=0.3",
    ]


def after_preflight(stage: MergeStage, items: list[Any]) -> list[Any]:
    """``process`` as after a preflight that passed: the server went down since."""
    from stages.merge.backends import make_backend

    stage.backend = make_backend(stage.cfg)
    try:
        return stage.process(items)
    finally:
        stage.teardown()


def test_server_down_at_the_start_stops_setup(tmp_path: Path) -> None:
    port = _free_port()
    stage = stage_for(tmp_path, openai_overrides(port))
    with pytest.raises(AbortRun) as err:
        stage.setup()
    msg = str(err.value)
    assert f"http://127.0.0.1:{port}/v1" in msg and "'openai/gpt-oss-20b'" in msg and "after 3 tries" in msg
    assert "\n" not in msg and stage.backend is None  # one line; the client is closed


def test_server_down_after_preflight_is_a_transient_failure(tmp_path: Path) -> None:
    stage = stage_for(tmp_path, openai_overrides(_free_port()))
    res = after_preflight(stage, [make_item("aaaaaaaaaaa_0_10000"), make_item("bbbbbbbbbbb_0_10000")])
    assert [r.status for r in res] == ["failed_transient"] * 2
    assert res[0].reason == "llm_connection" and "after 3 tries" in res[0].message
    tries = json.loads(res[0].outputs["merge_checks"])["merges"][0]["tries"]
    assert len(tries) == 1 and "llm_connection" in tries[0]["error"]  # no gate retries on a dead server


def test_hung_server_times_out(tmp_path: Path, silent_server: int) -> None:
    stage = stage_for(tmp_path, [*openai_overrides(silent_server), "merge.retries=0"])
    with pytest.raises(AbortRun, match="unreachable after 1 tries: ReadTimeout"):
        stage.setup()
    (res,) = after_preflight(stage, [make_item("aaaaaaaaaaa_0_10000", split="train")])
    assert res.status == "failed_transient" and res.reason == "llm_timeout", res
