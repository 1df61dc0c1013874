"""VeRA against deltatune's delta-method contract (``deltatune.testing``). The default partner, LoRA
on ``o_proj``, stacks on layers VeRA also adapts (both are additive)."""

from deltatune.testing import DeltaMethodContract


class TestVeraContract(DeltaMethodContract):
    method_name = "vera"
    config = {"r": 16, "targets": "all-linear", "dropout": 0.1}
    promises_identity_at_init = True  # b starts at zero
    supports_nf4 = True
