"""Tiny random-weight CLIP and CLAP built from the real transformers classes, saved to folders.

The scorers (:mod:`stages.scoring`) load them with the same ``from_pretrained(path)`` code they
use for ``openai/clip-vit-large-patch14`` and ``laion/larger_clap_general``: a ``CLIPModel`` with a
``CLIPProcessor`` and a ``ClapModel`` with a ``ClapProcessor`` (the real 48 kHz feature extractor
and the real HTSAT input size, so the real preprocessing runs), two layers and a width of 32 per
tower, with byte-level-free BPE tokenizers trained offline with ``tokenizers``. Their scores are
arbitrary by design (deterministic for a given input): they exercise loading, batching,
preprocessing and the ledgers, not caption quality.

Also :func:`clip_large_config` and :func:`clap_larger_general_config`, the real architectures in
code (no download), for the throughput benchmark with random weights, and
:func:`scorer_overrides`, the config overrides that point stages 3 and 4 at the stand-ins.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from standins.blip2 import _CORPUS

TINY_IMAGE_SIZE = 32
CLIP_SPECIAL = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
CLAP_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids: bos 0, pad 1, eos 2, unk 3


def _bpe(specials: list[str], bos: str, eos: str, vocab_size: int = 300) -> Any:
    """A BPE tokenizer (Metaspace, so every token is printable) that wraps text in ``bos``/``eos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    return tok


def _fast(tok: Any, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **special)


def _spread(model: Any, seed: int) -> None:
    """The default init (std 0.02) gives nearly the same embedding for every input, so every
    score would be the same. A larger init makes scores differ per input (a mix-up between the
    items of a batch shows) while layer norms keep activations bounded."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)


def _build(dest: Path, make: Callable[[Path], None]) -> Path:
    """Build into ``dest`` once, under a file lock; ``.complete`` marks a finished folder."""
    done = dest / ".complete"
    if done.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            make(dest)
            (dest / "STANDIN.json").write_text(
                json.dumps({"what": "tiny random-weight stand-in; its scores are meaningless"}) + "\n"
            )
            done.write_text("ok\n")
    return dest


def build_tiny_clip(dest: Path | str, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` + ``CLIPProcessor`` saved with ``save_pretrained`` into ``dest``."""

    def make(folder: Path) -> None:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        raw = _bpe(CLIP_SPECIAL, "<|startoftext|>", "<|endoftext|>")
        tok = _fast(
            raw, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
        )
        text = {
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "projection_dim": 16,
            # Not 2: CLIP takes id 2 for the legacy "eos is the largest id" pooling.
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
            "projection_dim": 16,
        }
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
        _spread(model, seed)
        images = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
        model.save_pretrained(folder)
        CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)

    return _build(Path(dest), make)


def build_tiny_clap(dest: Path | str, seed: int = 0) -> Path:
    """A tiny random ``ClapModel`` + ``ClapProcessor`` saved into ``dest``: the audio tower keeps
    the real HTSAT input (64 mel bins, spec size 256) and the processor is the real 48 kHz
    ``ClapFeatureExtractor`` of the unfused LAION checkpoints (``rand_trunc``, ``repeatpad``)."""

    def make(folder: Path) -> None:
        from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

        raw = _bpe(CLAP_SPECIAL, "<s>", "</s>")
        tok = _fast(raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        text = {
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            # RoBERTa positions start after the pad id: room for 64 tokens.
            "max_position_embeddings": 64 + tok.pad_token_id + 1,
            "projection_dim": 16,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        audio = {
            "spec_size": 256,
            "num_mel_bins": 64,
            "patch_embeds_hidden_size": 8,
            "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 1, 2, 2],
            "hidden_size": 64,  # patch_embeds_hidden_size * 2 ** (stages - 1)
            "projection_dim": 16,
            "enable_fusion": False,
        }
        model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).eval()
        _spread(model, seed)
        features = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
        model.save_pretrained(folder)
        ClapProcessor(feature_extractor=features, tokenizer=tok).save_pretrained(folder)

    return _build(Path(dest), make)


def scorer_overrides(models_dir: Path | str) -> list[str]:
    """Config overrides pointing stage 3's and stage 4's scorers at tiny stand-ins built (once)
    under ``models_dir``: how the demo and the tests run the scoring code offline."""
    models_dir = Path(models_dir)
    clip = build_tiny_clip(models_dir / "clip-tiny").resolve()
    clap = build_tiny_clap(models_dir / "clap-tiny").resolve()
    return [f"scoring.clip_model={clip}", f"scoring.clap_model={clap}"]


# -- the real architectures, for the benchmark (random weights, no download) ---------------------
def clip_large_config() -> Any:
    """``openai/clip-vit-large-patch14``: ViT-L/14 at 224 px (24 layers, width 1024) and a 12-layer
    text transformer of width 768, projected to 768 (428 M parameters)."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def clap_larger_general_config() -> Any:
    """``laion/larger_clap_general``: the unfused HTSAT-base audio tower (patch width 128, depths
    2-2-12-2, width 1024) and RoBERTa-base text, projected to 512."""
    from transformers import ClapConfig

    audio = {
        "spec_size": 256,
        "num_mel_bins": 64,
        "patch_embeds_hidden_size": 128,
        "depths": [2, 2, 12, 2],
        "num_attention_heads": [4, 8, 16, 32],
        "hidden_size": 1024,
        "projection_dim": 512,
        "enable_fusion": False,
    }
    text = {"vocab_size": 50265, "projection_dim": 512}  # RoBERTa-base: the class defaults
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=512)


def word_level_tokenizer(vocab_size: int, bos: int, eos: int, pad: int, unk: int) -> Any:
    """A word-level tokenizer of ``vocab_size`` ids (``w<id>``) with the real special-token ids, for
    the random-weight benchmark models (their real tokenizers are on the Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    names = {bos: "<bos>", eos: "<eos>", pad: "<pad>", unk: "<unk>"}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return _fast(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def write_stage2_media(
    workdir: Path | str,
    frame_rel: str,
    audio_rel: str,
    seed: int,
    seconds: float = 10.0,
    rate: int = 16000,
    size: tuple[int, int] = (128, 96),
) -> None:
    """A keyframe JPEG and a mono 16-bit FLAC as stage 2 writes them (``frame_rel`` and
    ``audio_rel`` relative to the run folder), distinct per ``seed``: a picture of random blocks,
    and a tone at a seed-dependent pitch in noise, for stand-in run folders whose stage 2 is not
    run for real but whose files the scorers read."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    workdir = Path(workdir)
    rng = np.random.default_rng(seed)
    frame = workdir / frame_rel
    frame.parent.mkdir(parents=True, exist_ok=True)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.NEAREST).save(frame, quality=90)
    t = np.arange(round(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * (seed % 50)) * t) + 0.05 * rng.standard_normal(t.size)
    audio = workdir / audio_rel
    audio.parent.mkdir(parents=True, exist_ok=True)
    sf.write(audio, tone.astype(np.float32), rate, subtype="PCM_16", format="FLAC")
