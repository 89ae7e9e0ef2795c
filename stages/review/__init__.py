"""Stage 5, review: people check the test merges in Label Studio; their verdicts become references.
Reads stage 4's ``merged_captions`` (+ keyframe, audio, captions); writes ``05-review/``: the push's
ledger (task ids), ``project.json``, ``reviews.parquet`` (pulled) and the local server's data.

All of stage 5 lives here; it imports earlier stages' public names (stage 2's middle-frame rule,
stage 4's score columns), never a later stage's (the export imports it):

- :mod:`stages.review.push`: the push stage (``avcaps run review``).
- :mod:`stages.review.connection`: the ``review:`` settings and the run's link to Label Studio
  (the API key, a checked client, the project remembered in ``project.json``).
- :mod:`stages.review.current`: which reviews are of a clip's current merge (pull and export alike).
- :mod:`stages.review.risk`: stage 4's scores as run percentiles, each clip's risk (push order).
- :mod:`stages.review.labeling`: the labeling config, the annotator instructions and the task payloads.
- :mod:`stages.review.guide`: the annotator guide page linked from the instructions.
- :mod:`stages.review.auth`: legacy tokens and personal access tokens (JWT refresh -> access tokens).
- :mod:`stages.review.client`: a small client of Label Studio's REST API (plain HTTP with ``requests``).
- :mod:`stages.review.policy`: several annotators per clip: the majority reference and the agreement.
- :mod:`stages.review.pull`: completed annotations -> ``DIR/05-review/reviews.parquet`` and its figures.
- :mod:`stages.review.server`: starts the real Label Studio server (its own venv) on 127.0.0.1.
- :mod:`stages.review.cli`: ``avcaps review pull|status|server``.
"""
