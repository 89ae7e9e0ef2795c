"""``caption.decoder: fast`` gives ``generate()``'s tokens, on CPU with the tiny random BLIP-2.

Token-for-token equality, with the stage's own settings (its prompt, ``max_new_tokens``, the
empty-caption retry with ``min_new_tokens`` and a repetition penalty), greedy and beam search,
captions that end at different lengths (some before ``max_new_tokens``, so the loop's early exit
runs), and a padded last chunk. Speed is not tested here: ``tests/benchmarks/bench_caption.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import AbortRun
from stages.caption.captioner import Captioner
from stages.caption.config import CaptionConfig

MAX_NEW = 10
CHUNK = 4
N_FRAMES = 22  # 5 full chunks of 4 and a last one of 2, padded to 4


def make_frames(n: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    """Distinct uint8 frames at the tiny model's input size (blocks of random colours)."""
    rng = np.random.default_rng(seed)
    block = np.ones((size // 8, size // 8, 1), dtype=np.uint8)
    return [np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), block) for _ in range(n)]


def captioner(model: Path, decoder: str, num_beams: int, **kw: Any) -> Captioner:
    cfg = CaptionConfig(
        model=str(model),
        decoder=decoder,
        num_beams=num_beams,
        max_new_tokens=MAX_NEW,
        gen_batch_size=CHUNK,
        **kw,
    )
    return Captioner(cfg)


def ended(row: list[int], cap: Captioner) -> bool:
    return bool(row) and row[-1] in cap.eos_ids


@pytest.mark.parametrize("retry", [False, True], ids=["stage-decoding", "empty-caption-retry"])
@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_fast_decoder_gives_generates_tokens(ending_blip2: Path, num_beams: int, retry: bool) -> None:
    gen = captioner(ending_blip2, "generate", num_beams)
    fast = captioner(ending_blip2, "fast", num_beams)
    decoding = gen.decoding.retry() if retry else gen.decoding
    assert (decoding.min_new_tokens, decoding.repetition_penalty) == ((3, 1.3) if retry else (0, 1.0))
    pool = make_frames(N_FRAMES)
    # Frames whose captions end soonest first: the first chunk then ends before MAX_NEW steps.
    first = gen.token_ids(pool, decoding)
    frames = [pool[i] for i in sorted(range(N_FRAMES), key=lambda i: (len(first[i]), i))]

    want = gen.token_ids(frames, decoding)
    got = fast.token_ids(frames, decoding)
    assert got == want

    # The case is the one claimed: mixed endings, an early exit, a padded last chunk.
    assert any(ended(r, gen) and len(r) < MAX_NEW for r in want), "no caption ends early"
    assert any(not ended(r, gen) for r in want), "every caption ends early"
    assert fast.fast is not None and min(fast.fast.decode_steps) < MAX_NEW, "the loop never exited early"
    assert max(fast.fast.decode_steps) == MAX_NEW
    assert N_FRAMES % CHUNK and len(fast.fast.decode_steps) == -(-N_FRAMES // CHUNK)
    assert len({tuple(r) for r in want}) > N_FRAMES // 3, "captions must depend on the image"
    # And the cleaned text the stage writes.
    assert fast.generate(frames, decoding) == gen.generate(frames, decoding)


@pytest.mark.parametrize("num_beams", [1, 5])
def test_fast_decoder_with_a_prompt(ending_blip2: Path, num_beams: int) -> None:
    frames = make_frames(6, seed=1)
    gen = captioner(ending_blip2, "generate", num_beams, prompt="a photo of")
    fast = captioner(ending_blip2, "fast", num_beams, prompt="a photo of")
    assert gen.input_ids.shape[1] > gen.model.config.num_query_tokens + 1  # the prompt is in it
    assert fast.token_ids(frames) == gen.token_ids(frames)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decode_step_is_one_graph_without_breaks(ending_blip2: Path, num_beams: int) -> None:
    """The step ``torch.compile`` turns into a CUDA graph on CUDA, traced here on CPU with
    ``fullgraph=True`` (any graph break, host sync or data-dependent branch is an error) through
    AOT autograd (functionalized in-place cache updates and beam reorder), and still exact."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from stages.caption.fast import FastDecoder

    frames = make_frames(7, seed=2)
    cap = captioner(ending_blip2, "fast", num_beams)
    want = cap.token_ids(frames)
    torch._dynamo.reset()
    counters.clear()
    cap.fast = FastDecoder(cap.model, cap.input_ids, {"backend": "aot_eager", "fullgraph": True})
    assert cap.token_ids(frames) == want
    assert counters["stats"]["unique_graphs"] == 1  # one shape, one graph, reused by every step
    assert not counters["graph_break"]


def test_stage_with_fast_decoder_equals_generate(
    tmp_path: Path, stage_factory: Any, items_factory: Any, ending_blip2: Path
) -> None:
    """CaptionStage.process: JPEGs, identical frames captioned once, chunks grouped per call."""
    items = items_factory(tmp_path, n_clips=5, frames=3)
    shutil.copy(tmp_path / items[0]["frame_paths"][0], tmp_path / items[0]["frame_paths"][1])
    kw = {"model": ending_blip2, "gen_batch_size": 2, "num_beams": 3}
    ref = stage_factory(tmp_path, **kw).process(items)
    fast = stage_factory(tmp_path, decoder="fast", **kw)
    got = fast.process(items)
    assert [r.outputs for r in got] == [r.outputs for r in ref]
    assert all(r.status == "ok" for r in got)
    assert fast.captioner.chunks_per_call > 1 and fast.unique_frames == 14


def test_empty_caption_retry_with_fast_decoder(
    tmp_path: Path, stage_factory: Any, items_factory: Any, mute_blip2: Any
) -> None:
    items = items_factory(tmp_path, n_clips=2, frames=2)
    for rescued in (True, False):
        model = mute_blip2(rescued=rescued)
        ref = stage_factory(tmp_path, model=model).process(items)
        got = stage_factory(tmp_path, model=model, decoder="fast").process(items)
        assert [(r.status, r.reason, r.outputs) for r in got] == [
            (r.status, r.reason, r.outputs) for r in ref
        ]
        assert all(r.status == ("ok" if rescued else "failed_permanent") for r in got)


def test_oom_back_off_with_fast_decoder(tmp_path: Path, stage_factory: Any, items_factory: Any) -> None:
    items = items_factory(tmp_path, n_clips=5, frames=2)
    ref = stage_factory(tmp_path, gen_batch_size=8).process(items)
    st = stage_factory(tmp_path, gen_batch_size=8, decoder="fast", simulate_oom_above=2)
    got = st.process(items)
    assert [r.outputs["frame_captions"] for r in got] == [r.outputs["frame_captions"] for r in ref]
    assert st.captioner.oom_events == [{"from": 8, "to": 4}, {"from": 4, "to": 2}]


def loaded(path: Path) -> tuple[Any, Any]:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    return Blip2ForConditionalGeneration.from_pretrained(path), Blip2Processor.from_pretrained(path)


def test_generation_config_the_fast_decoder_cannot_reproduce_is_refused(tiny_blip2: Path) -> None:
    """generate() takes its settings from the language model's generation config; one the fast
    decoder does not apply (here an n-gram ban) is refused at load, not silently ignored."""
    frames = make_frames(3, seed=5)
    model, proc = loaded(tiny_blip2)
    plain = Captioner(CaptionConfig(model=str(tiny_blip2), max_new_tokens=MAX_NEW), model, proc)
    before = plain.token_ids(frames)
    model.language_model.generation_config.no_repeat_ngram_size = 1
    assert plain.token_ids(frames) != before  # generate() does apply it
    with pytest.raises(AbortRun, match="no_repeat_ngram_size"):
        Captioner(CaptionConfig(model=str(tiny_blip2), decoder="fast"), model, proc)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_decoder_with_two_eos_tokens(tiny_blip2: Path, num_beams: int) -> None:
    """Several EOS ids (generate keeps more candidates per beam then), taken, as generate takes
    them, from the language model's generation config."""
    frames = make_frames(9, seed=6)
    runs = {}
    for decoder in ("generate", "fast"):
        model, proc = loaded(tiny_blip2)
        model.language_model.generation_config.eos_token_id = [proc.tokenizer.eos_token_id, 88]
        cfg = CaptionConfig(
            model=str(tiny_blip2),
            decoder=decoder,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW,
            gen_batch_size=4,
        )
        cap = Captioner(cfg, model, proc)
        runs[decoder] = cap.token_ids(frames)
    assert runs["fast"] == runs["generate"]
    assert any(r[-1] == 88 and len(r) < MAX_NEW for r in runs["generate"])  # the second EOS ends some


def test_decoder_config_errors() -> None:
    from pipeline.config import ConfigError, load_config
    from stages.config import RunConfig

    with pytest.raises(ConfigError, match="static_cache"):
        load_config(RunConfig, "manifests/demo.yaml", ["caption.decoder=fast", "caption.static_cache=true"])
    with pytest.raises(ConfigError, match="device_map"):
        load_config(RunConfig, "manifests/demo.yaml", ["caption.decoder=fast", "caption.device_map=auto"])
    cfg = load_config(RunConfig, "manifests/demo.yaml", ["caption.decoder=fast", "caption.compile=true"])
    assert cfg.caption.decoder == "fast" and cfg.caption.compile is True
    assert load_config(RunConfig, "manifests/demo.yaml", []).caption.decoder == "generate"


@pytest.mark.parametrize(("early_stopping", "length_penalty"), [(True, 1.0), ("never", 2.0), (False, 0.5)])
def test_fast_decoder_with_other_beam_settings(
    ending_blip2: Path, early_stopping: bool | str, length_penalty: float
) -> None:
    """The stage leaves these at generate()'s defaults, but a language model's generation config
    may set them; the port follows transformers' stopping heuristics for each."""
    frames = make_frames(9, seed=7)
    runs = {}
    for decoder in ("generate", "fast"):
        model, proc = loaded(ending_blip2)
        model.language_model.generation_config.early_stopping = early_stopping
        model.language_model.generation_config.length_penalty = length_penalty
        cfg = CaptionConfig(
            model=str(ending_blip2), decoder=decoder, num_beams=3, max_new_tokens=MAX_NEW, gen_batch_size=4
        )
        runs[decoder] = Captioner(cfg, model, proc).token_ids(frames)
    assert runs["fast"] == runs["generate"]


# -- checkpoints saved before BLIP-2 had an <image> token ---------------------------------------


def convert_legacy(legacy: Path, dest: Path) -> Path:
    """What the Hub's later revisions did to such a checkpoint: ``<image>`` added to the tokenizer
    (after the last token), ``image_token_index`` in the config, ``num_query_tokens`` in the
    processor. Same weights."""
    from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessor

    shutil.copytree(legacy, dest)
    tok = AutoTokenizer.from_pretrained(legacy)
    config = json.loads((legacy / "config.json").read_text())
    proc = Blip2Processor(
        BlipImageProcessor.from_pretrained(legacy), tok, num_query_tokens=config["num_query_tokens"]
    )
    proc.save_pretrained(dest)
    config["image_token_index"] = proc.tokenizer.convert_tokens_to_ids("<image>")
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("num_beams", [1, 3])
def test_checkpoint_from_before_the_image_token(tmp_path: Path, num_beams: int) -> None:
    from standins.blip2 import build_tiny_blip2_legacy

    legacy = build_tiny_blip2_legacy(tmp_path / "legacy", spare_rows=4)
    assert json.loads((legacy / "config.json").read_text()).get("image_token_index") is None
    assert not (legacy / "processor_config.json").exists()
    assert "<image>" not in (legacy / "tokenizer.json").read_text()
    converted = convert_legacy(legacy, tmp_path / "converted")
    frames = make_frames(6, seed=3)

    old = captioner(legacy, "generate", num_beams)
    # Blip2Processor added <image> after the 196 tokens; the embedding's spare rows hold it.
    assert old.model.config.image_token_index == 196
    assert old.model.get_input_embeddings().num_embeddings == 200
    assert old.input_ids[0].tolist()[:4] == [196] * 4
    new = captioner(converted, "generate", num_beams)
    want = new.token_ids(frames)
    assert old.token_ids(frames) == want  # the image is in the prompt, as in the converted one
    assert captioner(legacy, "fast", num_beams).token_ids(frames) == want
    assert len({tuple(r) for r in want}) == len(frames)


def test_checkpoint_from_before_the_image_token_without_a_spare_row(tmp_path: Path) -> None:
    """No row for the added id: the embedding grows to the next multiple of 64. The new rows
    are random, so the reference is the same loaded model through both decoders."""
    from standins.blip2 import build_tiny_blip2_legacy

    legacy = build_tiny_blip2_legacy(tmp_path / "legacy", spare_rows=0)
    frames = make_frames(6, seed=4)
    cap = captioner(legacy, "fast", 3)
    assert cap.model.config.image_token_index == 196
    assert cap.model.get_input_embeddings().num_embeddings == 256
    got = cap.token_ids(frames)
    assert len({tuple(r) for r in got}) == len(frames)  # the image is in the prompt
    assert all(cap.generate(frames))
    cap.fast = None  # the same weights through generate()
    assert cap.token_ids(frames) == got
