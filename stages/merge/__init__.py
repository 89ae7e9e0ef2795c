"""Stage 4, merge: an LLM merges each clip's audio caption(s) and visual caption into one caption.
Reads the clip table's ``audio_captions`` and stage 3's ``visual_caption`` (test split by default),
and with ``merge.score`` stage 2's ``audio_path`` and middle keyframe; writes ``04-merge/``:
``merged_captions``, the raw answers, every gate check and the prompt's hash, and with
``merge.score`` the CLAP and CLIP scores of the merges and of their sources.
"""
