"""Text normalization shared by stages, review and the evaluation kit (none imports another's).

Only what is the same everywhere lives here. The stages' own cleaners differ on purpose and stay
with them: captioning drops control and format characters (``stages.caption.captioner``), the
merge gate turns ASCII control characters into spaces (``stages.merge.gate``).
"""

from __future__ import annotations


def squash_spaces(text: str | None) -> str:
    """Runs of whitespace (Python's notion: NBSP and the other Unicode spaces too) to one space,
    ends trimmed; ``None`` becomes ``""``."""
    return " ".join((text or "").split())
