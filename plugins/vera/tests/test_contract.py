"""VeRA against deltatune's delta-method contract (``deltatune.testing``). The partner, LoRA on
``o_proj``, stacks on layers VeRA also adapts (both are additive)."""

from deltatune.testing import DeltaMethodContract


class TestVeraContract(DeltaMethodContract):
    method_name = "vera"
    config = {"r": 16, "targets": "all-linear", "dropout": 0.1}
    promises_identity_at_init = True  # b starts at zero
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["o_proj"]}}
