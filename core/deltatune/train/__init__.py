"""Training: the Lightning module, the token loss (with its chunked LM-head cross-entropy), the seam for a
model's fast training forward (a model family's), optimizers that update inside backward, learning-rate
schedules, atomic checkpoints, resuming (the run record a checkpoint holds, the run-folder checks) and the
run report.

May import every layer below it: :mod:`deltatune.evaluation`, :mod:`deltatune.io`,
:mod:`deltatune.data`, :mod:`deltatune.model`, :mod:`deltatune.deltas`, :mod:`deltatune.plugin`,
:mod:`deltatune.ui`.
"""
