"""Terminal output: rich tables and panels, and the progress bar.

May import: :mod:`deltatune.errors` only (types of what it prints are imported for type checking).
"""
