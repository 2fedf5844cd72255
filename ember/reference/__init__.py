"""A small trained LLaMA-shaped reference model, so accuracy figures (quantization, FP16) mean
something: the corpus that ships with Python (``corpus``), its training (``train``) and held-out
perplexity / top-1 agreement of torch models and Ember engine folders (``evaluate``).

Nothing in the runtime imports this package; ``scripts/train_reference_lm.py`` is its CLI.
"""
