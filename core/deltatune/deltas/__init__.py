"""Deltas: the delta-layer seam (:mod:`~deltatune.deltas.layer`: a base layer plus named deltas, merge and
unmerge, base weights read through a quantizer), target selection (:mod:`~deltatune.deltas.targets`), the
shared implementation of layer-based delta methods (:mod:`~deltatune.deltas.method`), the low-rank pair
LoRA-style methods build on (:mod:`~deltatune.deltas.lowrank`), PEFT tensor naming
(:mod:`~deltatune.deltas.peft_names`), and the seam by which a delta class computes several projections
that read one input as one grouped product (:mod:`~deltatune.deltas.grouped`).

May import: :mod:`deltatune.plugin`, :mod:`deltatune.errors`.
"""
