"""The delta-layer seam: the wrapper (base layer + deltas) that delta methods hook into, merge/unmerge,
target selection (``all-linear``, names, ``re:`` patterns), the low-rank base that LoRA-like methods
share, and PEFT tensor naming.

May import: :mod:`deltatune.plugin`, :mod:`deltatune.errors`.
"""
