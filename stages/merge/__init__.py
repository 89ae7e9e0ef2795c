"""Stage 4, merge: an LLM merges each clip's audio caption(s) and visual caption into one caption.
Reads the clip table's ``audio_captions`` and stage 3's ``visual_caption`` (test split by default);
writes ``04-merge/``: ``merged_captions``, the raw answers, every gate check and the prompt's hash.
"""
