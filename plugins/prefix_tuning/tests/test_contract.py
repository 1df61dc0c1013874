"""Prefix-tuning against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestPrefixTuningContract(DeltaMethodContract):
    method_name = "prefix_tuning"
    promises_identity_at_init = False  # a random prefix: every position attends to it from the start
    config = {"num_virtual_tokens": 4}
    quantizer = {"name": "nf4"}  # the prefix never reads a base weight
    compose_with = {"name": "lora", "config": {"targets": ["q_proj", "v_proj"]}}


class TestPrefixTuningProjectionContract(DeltaMethodContract):
    method_name = "prefix_tuning"
    promises_identity_at_init = False  # a random prefix: every position attends to it from the start
    config = {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}
    saves_computed = True  # the reparameterisation MLP is dropped at save: the bundle holds the computed prefixes
    compose_with = {"name": "bitfit"}
    tiny_overrides = {"attention_bias": True}
