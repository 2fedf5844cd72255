"""Small trained reference models, so accuracy figures (quantization, FP16, cache reuse) mean
something.

Language model: the corpus that ships with Python (``corpus``), its training (``train``) and
held-out perplexity / top-1 agreement of torch models and Ember engine folders (``evaluate``).
Diffusion pipeline: coloured shapes drawn with Pillow (``shapes``) and the training of an
SD-1.x-shaped latent diffusion pipeline on them (``diffusion_train``).

Nothing in the runtime imports this package; ``scripts/train_reference_lm.py`` and
``scripts/train_reference_diffusion.py`` are its CLIs.
"""
