"""A tiny random-weight BLIP-2 built from the real transformers classes, saved to a folder.

The caption stage loads it with the same ``from_pretrained(path)`` code it uses for
``Salesforce/blip2-opt-2.7b``: a ``Blip2ForConditionalGeneration`` (ViT + Q-Former + OPT, two layers
each, hidden size 32) and a ``Blip2Processor`` whose byte-level BPE tokenizer is trained offline
with ``tokenizers`` on a few sentences. Its captions are meaningless by design: it exercises the
loading, batching, generation and decoding code, not caption quality.

Also :func:`blip2_opt_config`, the real blip2-opt-2.7b architecture written in code (no download),
used by the throughput benchmark with random weights.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

TINY_QUERY_TOKENS = 4
TINY_IMAGE_SIZE = 32
_CORPUS = [
    "a man is speaking while a dog barks in the background",
    "a car engine revs and tires squeal on a wet road",
    "a woman sings on a stage with a guitar",
    "birds chirp in a green forest near a river",
    "a train passes by a station with people waiting",
    "children laugh and play in a park on a sunny day",
    "a photo of a cat sitting on a wooden table",
    "water flows over rocks in a small stream",
    "an airplane flies over a city at night",
    "a crowd cheers at a football match in a stadium",
]
SPECIAL = {"bos": "</s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "image": "<image>"}


def _fast_tokenizer(tok: Any, image_token: bool = True) -> Any:
    """OPT-style special tokens, left padding, and (``image_token``) the ``<image>`` token of BLIP-2."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
    )
    if image_token:
        # Registered as an added special token (as in the real checkpoint), so it is never split and
        # Blip2Processor finds it already in the vocabulary.
        fast.add_special_tokens({"additional_special_tokens": [SPECIAL["image"]]})
    return fast


def _train_tokenizer(vocab_size: int = 200, image_token: bool = True) -> Any:
    """A BPE tokenizer in OPT's layout: ``</s>`` is both BOS and EOS, and BOS is prepended.

    Metaspace (``▁word``) rather than OPT's byte-level pre-tokenizer: every token of this small
    vocabulary is then printable text, so random weights give word-like captions, not control bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", SPECIAL["pad"], SPECIAL["eos"], SPECIAL["unk"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + ([SPECIAL["image"]] if image_token else []),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A",
        pair=f"{SPECIAL['bos']} $A $B",
        special_tokens=[(SPECIAL["bos"], bos_id)],
    )
    return _fast_tokenizer(tok, image_token)


def tiny_blip2_config(
    vocab_size: int, image_token_index: int | None, pad_id: int, bos_id: int, eos_id: int
) -> Any:
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=32,
        vocab_size=vocab_size,
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=TINY_QUERY_TOKENS,
        image_token_index=image_token_index,
    )


def build_tiny_blip2(dest: Path | str, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny random BLIP-2 (model + processor) into ``dest``.

    Idempotent and safe across processes: a finished folder (with ``.complete``) is reused; the
    build happens under a file lock and the folder is filled before ``.complete`` is written.
    """
    dest = Path(dest)
    done = dest / ".complete"
    if done.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return dest
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

        tokenizer = _train_tokenizer()
        image_token_id = tokenizer.convert_tokens_to_ids(SPECIAL["image"])
        config = tiny_blip2_config(
            vocab_size=len(tokenizer),
            image_token_index=image_token_id,
            pad_id=tokenizer.pad_token_id,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
        # The default init (std 0.02) makes every image give the same caption and near-flat
        # logits. A larger init makes the caption depend on the image (so a mix-up between
        # images in a batch shows) and keeps greedy choices well separated.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.5)
            model.query_tokens.normal_(0.0, 1.0)
        image_processor = BlipImageProcessor(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
            do_convert_rgb=True,
        )
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=TINY_QUERY_TOKENS)
        model.save_pretrained(dest)
        processor.save_pretrained(dest)
        (dest / "STANDIN.json").write_text(
            json.dumps({"what": "tiny random-weight BLIP-2 stand-in; captions are meaningless"}) + "\n"
        )
        done.write_text("ok\n")
    return dest


def build_tiny_blip2_legacy(dest: Path | str, spare_rows: int = 4, seed: int = 0) -> Path:
    """A tiny random BLIP-2 saved as checkpoints were before BLIP-2 had an ``<image>`` token (early
    revisions of ``Salesforce/blip2-opt-2.7b``): no ``image_token_index`` in the config, no
    ``processor_config.json`` (so no ``num_query_tokens``), no ``<image>`` in the tokenizer.

    ``Blip2Processor`` adds ``<image>`` at load time, with the id after the last token. The
    embedding has ``spare_rows`` rows beyond the tokenizer, as OPT-2.7b has (50,272 rows for
    50,265 tokens): with some, the new id has a row already; with 0, the model must grow one.
    Not cached: a new folder each call (tests edit copies of it).
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, BlipImageProcessor

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size=196, image_token=False)
    config = tiny_blip2_config(
        vocab_size=len(tokenizer) + spare_rows,
        image_token_index=None,
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # as build_tiny_blip2: captions that depend on the image
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
        model.query_tokens.normal_(0.0, 1.0)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    BlipImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, do_convert_rgb=True
    ).save_pretrained(dest)
    (dest / "STANDIN.json").write_text(
        json.dumps({"what": "tiny random-weight BLIP-2 in the pre-<image>-token layout"}) + "\n"
    )
    return dest


def blip2_opt_config(layers: str = "full") -> Any:
    """The ``Salesforce/blip2-opt-2.7b`` architecture, written in code (no download).

    ``layers="full"``: the real shape (ViT-g 39 layers, Q-Former 12, OPT-2.7b 32 layers, 3.745 B
    params). ``"mid"``: the same widths with a few layers each, for a CPU run of the benchmark.
    """
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    full = layers == "full"
    vision = Blip2VisionConfig(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39 if full else 2,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12 if full else 2,
        num_attention_heads=12,
        encoder_hidden_size=1408,
        cross_attention_frequency=2,
        vocab_size=30522,
    )
    text = OPTConfig(
        vocab_size=50304,
        hidden_size=2560 if full else 1024,
        ffn_dim=10240 if full else 4096,
        num_hidden_layers=32 if full else 2,
        num_attention_heads=32 if full else 16,
        word_embed_proj_dim=2560 if full else 1024,
        max_position_embeddings=2048,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=50265,
    )


def blip2_opt_processor(
    vocab_size: int = 50304, image_token_index: int = 50265, image_size: int = 224
) -> Any:
    """A ``Blip2Processor`` for :func:`blip2_opt_config`: OPT's special-token ids and vocabulary
    size (a word-level vocabulary ``w<id>``, so any generated id decodes), the real image settings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Blip2Processor, BlipImageProcessor

    vocab = {f"w{i}": i for i in range(vocab_size)}
    names = {
        0: "<s>",
        1: SPECIAL["pad"],
        2: SPECIAL["eos"],
        3: SPECIAL["unk"],
        image_token_index: SPECIAL["image"],
    }
    for i, name in names.items():
        del vocab[f"w{i}"]
        vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B", special_tokens=[(SPECIAL["bos"], 2)]
    )
    fast = _fast_tokenizer(tok)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, do_convert_rgb=True
    )
    return Blip2Processor(image_processor, fast, num_query_tokens=32)
