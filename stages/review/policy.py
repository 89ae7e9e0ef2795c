"""Several annotators on one clip: which answer becomes the reference, and how much they agree.

**Votes.** Each annotator has one vote per task: their most recent submitted annotation (an
annotator who submits twice, or updates an answer, changed their mind). A vote whose answer cannot
be used is set aside and reported, never guessed at: an unknown verdict, an "edited" with no text,
or an edit whose number of lines differs from the number of merged captions (each line is the merge
of one audio caption; with a line missing or added, lines can no longer be matched to captions).

**The final reference** (``decide``), from the usable votes:

1. *Keep or reject.* The clip is rejected unless more annotators kept it (accept or edited) than
   rejected it: a tie rejects, because a reference one reviewer in two refuses is not one to report
   results on. The tie is reported as a disagreement; another annotation breaks it.
2. *Accept or edited*, among the keeps: edited when at least as many annotators edited as
   accepted (a tie goes to the edit: someone found a flaw and fixed it), accept otherwise.
3. *Which text.* accept: the merge as pushed. edited: one annotator's edit, by ``edit_policy``:
   ``latest`` (default) the edit of the annotator who answered last; ``medoid`` the edit with the
   smallest total word edit distance to the other edits (ties: the latest), i.e. the most central.

**Agreement** on verdicts (``agreement``) over the clips with two votes or more: Cohen's kappa when
those clips were all reviewed by the same two annotators, Fleiss' kappa otherwise (any number of
annotators, not necessarily the same ones per clip; with a varying number of votes per clip the
usual generalization ``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))`` and category shares over all
votes). Both are computed here from their formulas (Cohen 1960; Fleiss 1971) rather than with
statsmodels or scikit-learn, each far heavier than the ten lines they would replace; the tests check
them against the published worked examples and against NLTK's ``AnnotationTask``. Kappa is
undefined (None) when chance agreement is 1 (every vote the same verdict). Beside it, the mean word
edit distance between two annotators' kept captions of the same clip (an accept's captions are the
merge) says how differently people correct.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

VERDICTS: tuple[str, ...] = ("accept", "edited", "rejected")
KEEP = ("accept", "edited")
EditPolicy = Literal["latest", "medoid"]

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of ``a`` and ``b`` (case and punctuation
    ignored)."""
    x, y = words(a), words(b)
    prev = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        cur = [i]
        for j, wy in enumerate(y, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wx != wy)))
        prev = cur
    return prev[-1]


def captions_distance(merged: Sequence[str], final: Sequence[str]) -> float:
    """Mean word edit distance over the caption pairs (a missing caption counts as empty)."""
    n = max(len(merged), len(final))
    if n == 0:
        return 0.0
    pad = lambda xs: list(xs) + [""] * (n - len(xs))  # noqa: E731
    return sum(word_edit_distance(m, f) for m, f in zip(pad(merged), pad(final), strict=True)) / n


@dataclass(frozen=True)
class Vote:
    """One annotator's usable answer on one clip."""

    annotator: str
    verdict: str
    captions: tuple[str, ...]  # the merge (accept), the edit (edited), nothing (rejected)
    comment: str
    updated_at: datetime
    annotation_id: int

    @property
    def order(self) -> tuple[datetime, int]:
        return (self.updated_at, self.annotation_id)


@dataclass(frozen=True)
class Decision:
    verdict: str
    captions: tuple[str, ...]
    chosen: Vote  # the vote whose answer (and comment) the reference is
    counts: dict[str, int]

    @property
    def disagreement(self) -> bool:
        return sum(1 for n in self.counts.values() if n) > 1


def decide(votes: Sequence[Vote], merged: Sequence[str], edit_policy: EditPolicy = "latest") -> Decision:
    """The clip's reference from its usable votes (at least one), by the policy above."""
    if not votes:
        raise ValueError("decide() needs at least one vote")
    counts = {v: sum(1 for x in votes if x.verdict == v) for v in VERDICTS}
    latest = lambda vs: max(vs, key=lambda x: x.order)  # noqa: E731
    keeps = counts["accept"] + counts["edited"]
    if counts["rejected"] >= keeps:
        return Decision("rejected", (), latest([v for v in votes if v.verdict == "rejected"]), counts)
    if counts["accept"] > counts["edited"]:
        return Decision("accept", tuple(merged), latest([v for v in votes if v.verdict == "accept"]), counts)
    edits = [v for v in votes if v.verdict == "edited"]
    chosen = latest(edits)
    if edit_policy == "medoid" and len(edits) > 2:
        # Smallest total distance to the other edits; the latest among equals.
        def spread(v: Vote) -> float:
            return sum(captions_distance(v.captions, w.captions) for w in edits if w is not v)

        best = min(spread(v) for v in edits)
        chosen = latest([v for v in edits if spread(v) == best])
    return Decision("edited", chosen.captions, chosen, counts)


# -- agreement --------------------------------------------------------------------------------------
def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items: ``(p_o - p_e) / (1 - p_e)``."""
    n = len(pairs)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(first[k] * second[k] for k in first.keys() | second.keys()) / (n * n)
    return None if p_e >= 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(items: Sequence[dict[str, int]]) -> tuple[float | None, float]:
    """Fleiss' kappa and the mean observed agreement ``P_bar`` over items given as category
    counts (each item rated at least twice; the number of ratings may vary by item)."""
    items = [c for c in items if sum(c.values()) >= 2]
    if not items:
        return None, float("nan")
    p_i = []
    totals: Counter[str] = Counter()
    for counts in items:
        n = sum(counts.values())
        p_i.append((sum(x * x for x in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
    p_bar = sum(p_i) / len(p_i)
    all_votes = sum(totals.values())
    p_e = sum((x / all_votes) ** 2 for x in totals.values())
    return (None if p_e >= 1 else (p_bar - p_e) / (1 - p_e)), p_bar


def agreement(votes_by_clip: Mapping[str, Sequence[Vote]]) -> dict[str, Any]:
    """Inter-annotator agreement on verdicts and the distance between annotators' kept captions."""
    multi = {cid: vs for cid, vs in votes_by_clip.items() if len(vs) >= 2}
    raters = sorted({v.annotator for vs in multi.values() for v in vs})
    out: dict[str, Any] = {
        "method": None,
        "kappa": None,
        "observed_agreement": None,
        "clips": len(multi),
        "annotators": len(raters),
        "votes": sum(len(vs) for vs in multi.values()),
        "inter_annotator_word_edit_distance": None,
        "caption_pairs": 0,
    }
    if not multi:
        out["note"] = "no clip has answers from two annotators"
        return out
    if len(raters) == 2:
        a, b = raters
        pairs = []
        for vs in multi.values():
            by = {v.annotator: v.verdict for v in vs}
            pairs.append((by[a], by[b]))
        out["method"] = "cohen"
        out["kappa"] = cohen_kappa(pairs)
        out["observed_agreement"] = sum(x == y for x, y in pairs) / len(pairs)
    else:
        kappa, p_bar = fleiss_kappa([Counter(v.verdict for v in vs) for vs in multi.values()])
        out["method"] = "fleiss"
        out["kappa"] = kappa
        out["observed_agreement"] = p_bar
    if out["kappa"] is None:
        out["note"] = "every answer has the same verdict: kappa is undefined (agreement is complete)"
    dists = list(_caption_distances(multi.values()))
    out["caption_pairs"] = len(dists)
    if dists:
        out["inter_annotator_word_edit_distance"] = sum(dists) / len(dists)
    return out


def _caption_distances(groups: Iterable[Sequence[Vote]]) -> Iterable[float]:
    for vs in groups:
        kept = [v for v in vs if v.verdict in KEEP]
        for a, b in itertools.combinations(kept, 2):
            yield captions_distance(a.captions, b.captions)


def describe(figures: dict[str, Any]) -> str:
    """One line for people (status, the dataset card)."""
    if not figures.get("clips"):
        return "inter-annotator agreement: not measured (no clip was reviewed by two annotators)"
    name = {"cohen": "Cohen's kappa", "fleiss": "Fleiss' kappa"}[figures["method"]]
    kappa = figures["kappa"]
    value = "undefined (all verdicts the same)" if kappa is None else f"{kappa:.3f}"
    line = (
        f"inter-annotator agreement on verdicts: {name} {value} over {figures['clips']} clips "
        f"reviewed by {figures['annotators']} annotators ({figures['votes']} answers, observed "
        f"agreement {figures['observed_agreement']:.1%})"
    )
    dist = figures.get("inter_annotator_word_edit_distance")
    if dist is not None:
        line += (
            f"; mean word edit distance between two annotators' captions {dist:.2f} "
            f"({figures['caption_pairs']} pairs)"
        )
    return line
