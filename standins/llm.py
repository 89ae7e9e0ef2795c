"""A tiny random-weight chat model for stage 4 (merge), built locally from real classes.

It stands in for ``openai/gpt-oss-20b`` in tests, the demo and the CPU benchmark: a
``LlamaForCausalLM`` (2 layers, hidden 128, 2 heads so head_dim is 64, the least vLLM's CPU
attention takes) saved with ``save_pretrained``, a byte-level BPE tokenizer trained offline with
``tokenizers`` on the AudioCaps captions (so its random output is made of caption words), and a
small Jinja chat template. Both ``transformers`` (``from_pretrained(path)``) and vLLM's
OpenAI-compatible server load the folder. Llama rather than a tiny GptOss: gpt-oss's Harmony chat
format downloads a tiktoken file at load time, which cannot happen offline.

Random weights almost never pick the end token, so every answer would run to its token budget,
which stage 4 rightly takes for a cut-off answer. By default the generation config forces the end
token at the last step of the budget (``forced_eos_token_id``), so in ``transformers`` the stand-in
ends its answers within budget as a chat model does (``ends_answers=False`` keeps the cut-off
behaviour). vLLM's server does not read that setting: served answers without structured output
still run to ``max_tokens`` (``finish_reason`` "length").
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.stage import Item

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MODEL_NAME = "tiny-random-chat"


def _corpus(csv_dir: Path) -> list[str]:
    lines: list[str] = []
    for name in ("test.csv", "val.csv"):
        path = csv_dir / name
        if path.exists():
            with open(path, newline="", encoding="utf-8") as fh:
                lines += [row["caption"] for row in csv.DictReader(fh)]
    # JSON punctuation, so structured output has tokens to build '{"caption": "..."}' from.
    lines += ['{"caption": "A man speaks while a dog barks"}'] * 50
    return lines


def build_tiny_chat_model(
    dest: Path | str,
    csv_dir: Path | str = Path("manifests/audiocaps"),
    vocab_size: int = 2000,
    seed: int = 0,
    ends_answers: bool = True,
) -> Path:
    """Build (or reuse, if complete) the tiny chat model under ``dest``; returns ``dest``."""
    dest = Path(dest)
    if (dest / "done.json").exists():
        return dest
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(Path(csv_dir)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    if ends_answers:
        model.generation_config.forced_eos_token_id = fast.eos_token_id
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    (tmp / "done.json").write_text(
        json.dumps({"name": MODEL_NAME, "seed": seed, "ends_answers": ends_answers}) + "\n"
    )
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)  # the folder appears complete or not at all
    return dest


# Contract-shaped inputs of stage 4 (tests and the benchmark): one clip row plus stage 3 outputs.
AUDIO5 = [
    "A dog barks repeatedly while a man speaks",
    "A man talks as a dog barks",
    "Dog barking and a man speaking",
    "A man speaks and a dog barks in the distance",
    "A dog barks while a person talks",
]
VISUAL = "a man standing in a backyard with a brown dog"


def make_merge_item(clip_id: str, split: str = "test", **over: Any) -> Item:
    """An item as stage 4 sees it: the clip row plus the caption stage's outputs (the contract)."""
    from pipeline.stage import Item

    data: dict[str, Any] = {
        "youtube_id": clip_id[:11],
        "start_s": 0,
        "end_s": 10,
        "split": split,
        "audio_captions": list(AUDIO5) if split != "train" else AUDIO5[:1],
        "audiocap_ids": [1, 2, 3, 4, 5] if split != "train" else [1],
        "visual_caption": VISUAL,
        "frame_captions": [VISUAL],
    }
    data.update(over)
    return Item(clip_id, data)
