"""``deltatune estimate``: parameters and peak memory of a run, counted on the meta device before any
hardware is bought.

May import: :mod:`deltatune.train` and every layer below it.
"""
