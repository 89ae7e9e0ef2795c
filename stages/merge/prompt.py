"""Stage 4's prompt: one versioned YAML file (system text, the two user templates, few-shot
examples for both forms) whose sha256 goes on every row; older versions stay loadable
(``merge.prompt_file``), so old rows keep their meaning."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import AbortRun

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "merge_v2.yaml"


@dataclass(frozen=True)
class Prompt:
    """A prompt file: system text, the two user templates, and few-shot examples per form.

    ``few_shot_one`` examples (one audio caption each) precede a one-caption prompt,
    ``few_shot_all`` examples (a list of audio captions each) an all-captions prompt. A file with
    a single ``few_shot`` list (``merge_v1``) uses it for both forms, as v1 did.
    """

    version: str
    sha256: str
    system: str
    user_one: str
    user_all: str
    few_shot_one: list[dict[str, Any]]
    few_shot_all: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Prompt:
        import yaml

        try:
            raw = path.read_bytes()
            data = yaml.safe_load(raw)
            legacy = list(data.get("few_shot") or [])
            prompt = cls(
                version=str(data["version"]),
                sha256=hashlib.sha256(raw).hexdigest(),
                system=data["system"],
                user_one=data["user_one"],
                user_all=data["user_all"],
                few_shot_one=list(data.get("few_shot_one") or legacy),
                few_shot_all=list(data.get("few_shot_all") or legacy),
            )
            for ex in prompt.few_shot_one + prompt.few_shot_all:
                missing = {"audio", "visual", "caption"} - set(ex)
                if missing:
                    raise KeyError(f"few-shot example {ex!r} lacks {sorted(missing)}")
        except (OSError, AttributeError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise AbortRun(f"merge prompt file {path}: {type(exc).__name__}: {exc}") from exc
        return prompt

    def user(self, audio: str | list[str], visual: str) -> str:
        """The user turn for one audio caption (a string) or several (a list: numbered)."""
        if isinstance(audio, str):
            template, text = self.user_one, audio
        else:
            template, text = self.user_all, "\n".join(f"{i}. {a}" for i, a in enumerate(audio, 1))
        return template.replace("{audio}", text).replace("{visual}", visual).strip()

    def messages(self, audio: list[str], visual: str, max_words: int) -> list[dict[str, str]]:
        """System text, the few-shot pairs of this form as earlier turns, then this clip's captions."""
        msgs = [{"role": "system", "content": self.system.replace("{max_words}", str(max_words)).strip()}]
        for ex in self.few_shot_one if len(audio) == 1 else self.few_shot_all:
            msgs.append({"role": "user", "content": self.user(ex["audio"], ex["visual"])})
            msgs.append({"role": "assistant", "content": json.dumps({"caption": ex["caption"]})})
        msgs.append({"role": "user", "content": self.user(audio[0] if len(audio) == 1 else audio, visual)})
        return msgs
