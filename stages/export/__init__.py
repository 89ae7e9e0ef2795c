"""Stage 6, export: the dataset in the Hugging Face ``datasets`` layout, a config per training variant.
Reads the clip table, the ledgers of stages 1-5 and ``05-review/reviews.parquet`` (pulled first);
writes ``export/``: Parquet shards, the card, ``statistics.json``, ``LICENSE`` and ``SHA256SUMS``.
"""
