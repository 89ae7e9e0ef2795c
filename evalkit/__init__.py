"""The evaluation kit (``avcaps eval``) and the modality-robustness kit (``avcaps perturb``,
``avcaps robustness``): score captions exactly as the COCO caption toolkit does, and measure how
much a model's captions depend on each modality."""
