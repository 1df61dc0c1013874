"""Scaled activations against deltatune's delta-method contract: the tests every delta method passes.

Nothing here is specific to this method: the contract kit (``deltatune.testing``, loaded by pytest
through its ``pytest11`` entry point) builds the tiny model with the installed plugins, and checks
training, initialisation, merge/unmerge, save/reload, composition with LoRA and an NF4 base.
"""

from deltatune.testing import DeltaMethodContract


class TestScaledActivationsContract(DeltaMethodContract):
    method_name = "scaled_activations"
    config = {"targets": ["k_proj", "v_proj", "down_proj"]}
    promises_identity_at_init = True  # every scale starts at 1
    quantizer = {"name": "nf4"}  # it scales activations and never reads the base weight
    compose_with = {"name": "lora", "config": {"targets": ["q_proj", "o_proj"]}}


class TestScaledActivationsWithBiasesContract(DeltaMethodContract):
    """Output scaling also scales a bias; merge must fold it into the bias as well."""

    method_name = "scaled_activations"
    config = {"targets": "all-linear"}
    tiny_overrides = {"attention_bias": True, "mlp_bias": True}
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["lm_head"]}}
