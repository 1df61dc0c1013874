"""Models: loading a base (Hugging Face folder, GGUF file, the embedded default, tiny test models),
assembling what a run trains (base → quantizer → delta methods → freeze), precision and generation.

May import: :mod:`deltatune.deltas`, :mod:`deltatune.plugin`, :mod:`deltatune.errors`.
"""
