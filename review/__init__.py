"""Human review of the test merges in Label Studio (stage 5).

- :mod:`review.labeling`: the labeling config, the annotator instructions and the task payloads.
- :mod:`review.guide`: the annotator guide page linked from the instructions.
- :mod:`review.auth`: legacy tokens and personal access tokens (JWT refresh -> access tokens).
- :mod:`review.client`: a small client of Label Studio's REST API (plain HTTP with ``requests``).
- :mod:`review.policy`: several annotators per clip: the majority reference and the agreement.
- :mod:`review.pull`: completed annotations -> ``DIR/05-review/reviews.parquet`` and its figures.
- :mod:`review.server`: starts the real Label Studio server (its own venv) on 127.0.0.1.
- :mod:`review.cli`: ``avcaps review pull|status|server``.
"""
