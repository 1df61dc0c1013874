"""IA3 against deltatune's delta-method contract: the tests every delta method passes.

Nothing here is IA3-specific: the contract kit (``deltatune.testing``, loaded by pytest through
its ``pytest11`` entry point) builds the tiny model with the installed plugins, and checks training,
initialisation, merge/unmerge, save/reload, composition with LoRA and an NF4 base.
"""

from deltatune.testing import DeltaMethodContract


class TestIA3Contract(DeltaMethodContract):
    method_name = "ia3"
    config = {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}
    promises_identity_at_init = True  # every scale starts at 1
    quantizer = {"name": "nf4"}  # it scales activations and never reads the base weight
    compose_with = {"name": "lora", "config": {"targets": ["q_proj", "o_proj"]}}


class TestIA3EveryLinearContract(DeltaMethodContract):
    method_name = "ia3"
    config = {"targets": "all-linear", "feedforward": ["re:.*mlp\\.down_proj"]}
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["lm_head"]}}


class TestIA3WithBiasesContract(DeltaMethodContract):
    """Output scaling also scales a bias; merge must fold it into the bias as well."""

    method_name = "ia3"
    config = {"targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}
    tiny_overrides = {"attention_bias": True, "mlp_bias": True}
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["o_proj", "gate_proj"]}}
