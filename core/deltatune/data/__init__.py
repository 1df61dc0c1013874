"""Data: reading records, encoding examples and conversations into rows with a loss mask, mixing
several datasets, packing and batching, and the Lightning data module.

May import: :mod:`deltatune.model` (tokenizers, chat prompts), :mod:`deltatune.plugin`,
:mod:`deltatune.ui`, :mod:`deltatune.errors`.
"""
