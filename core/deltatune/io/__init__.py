"""Files deltatune writes and reads back: atomic writes, the adapter bundle (``deltatune.json`` +
safetensors, :mod:`~deltatune.io.adapter`), PEFT export/import (:mod:`~deltatune.io.peft`) and
merged-model export (:mod:`~deltatune.io.merged`).

May import: :mod:`deltatune.model`, :mod:`deltatune.deltas`, :mod:`deltatune.plugin` and below.
"""
