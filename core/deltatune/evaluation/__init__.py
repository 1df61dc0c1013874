"""What evaluator plugins share: answer rows, batched generation, answer normalisation, per-family
summaries and sequence log-likelihoods; and how a run names its evaluators.

May import: :mod:`deltatune.data`, :mod:`deltatune.model` and the layers below them.
"""
