"""Stage 3, caption: every keyframe of a clip captioned by BLIP-2 (one model load per worker).
Reads stage 2's ``frame_paths`` and ``middle_frame`` (JPEGs under ``media/``); writes
``03-caption/``: ``frame_captions``, the clip's ``visual_caption`` and the model's provenance.
"""
