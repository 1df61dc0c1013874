"""The fast training forward of the Llama-like families (:mod:`~deltatune_families.fast.llama`), its
kernels with hand-written backward (:mod:`~deltatune_families.fast.kernels`) and the unpadded token
layout it computes on (:mod:`~deltatune_families.fast.tokens`). Imported only when a model of these
families asks for it."""
