"""Benchmark: scoring the AudioCaps test split (975 clips, leave-one-out) several times in one
process, ours against the naive way, in the same run.

- ours: :func:`evalkit.metrics.evaluate` (pycocoevalcap's scorers, one METEOR process reused);
- naive: what a script around pycocoevalcap's ``COCOEvalCap.evaluate`` does per call: a fresh
  tokenizer and fresh scorers, so a fresh METEOR JVM and paraphrase table every time.

Both compute BLEU-1..4, ROUGE-L, METEOR, CIDEr-D (no SPICE) and give identical numbers (checked).
Figures: seconds per call, first and later calls. ``BENCH_CALLS`` (default 3) calls each.
Run with ``make bench``; record the printed table in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import time

from evalkit.metrics import evaluate
from standins.evalkit import audiocaps_test_captions


def naive(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    meteor = Meteor()
    out = {
        "BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "METEOR": meteor.compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }
    del meteor
    return out


def test_bench_eval_975_clips() -> None:
    calls = int(os.environ.get("BENCH_CALLS", "3"))
    caps = audiocaps_test_captions()
    preds = {c: v[0] for c, v in caps.items()}
    refs = {c: v[1:] for c, v in caps.items()}
    rows = []
    for name, fn in (
        ("ours", lambda: evaluate(preds, refs, use_spice=False).values),
        ("naive", lambda: naive(preds, refs)),
    ):
        times, last = [], None
        for _ in range(calls):
            t0 = time.perf_counter()
            last = fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, times, last))
    (_, _, ours), (_, _, theirs) = rows
    assert all(ours[m] == theirs[m] for m in theirs), "same numbers"
    print(f"\n975 clips x {calls} calls, seconds per call (BLEU, ROUGE-L, METEOR, CIDEr-D; no SPICE)")
    print(f"{'way':6s}  {'first':>7s}  {'later (mean)':>12s}  {'total':>7s}")
    for name, times, _ in rows:
        later = sum(times[1:]) / max(1, len(times) - 1)
        print(f"{name:6s}  {times[0]:7.2f}  {later:12.2f}  {sum(times):7.2f}")
