"""The Llama family's fast training forward (:mod:`~deltatune_families.fast.llama`), its kernels with
hand-written backward (:mod:`~deltatune_families.fast.kernels`) and the unpadded token layout it
computes on (:mod:`~deltatune_families.fast.tokens`). Imported only when a Llama model asks for it."""
