"""BitFit against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestBitfitAddsBiasesContract(DeltaMethodContract):
    method_name = "bitfit"
    config = {"targets": "all-linear"}  # the tiny Llama has no biases: zero biases are added
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["o_proj"]}}


class TestBitfitExistingBiasesContract(DeltaMethodContract):
    method_name = "bitfit"
    config = {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "add_missing": "never"}
    tiny_overrides = {"attention_bias": True, "mlp_bias": True}
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["o_proj"]}}
