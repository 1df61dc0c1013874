"""``deltatune estimate``: parameters and peak memory of a run, counted on the meta device before any
hardware is bought: :mod:`~deltatune.estimate.counting` (parameters, on the meta device),
:mod:`~deltatune.estimate.activations` (what autograd keeps) and :mod:`~deltatune.estimate.memory`
(the bytes per device). The command line is :mod:`deltatune.cli.estimate`.

May import: :mod:`deltatune.train` and every layer below it.
"""
