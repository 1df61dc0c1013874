"""Files deltatune writes and reads back: atomic writes, the adapter bundle (``deltatune.json`` +
safetensors), PEFT export/import and merged-model export.

May import: :mod:`deltatune.model`, :mod:`deltatune.deltas`, :mod:`deltatune.plugin` and below.
"""
