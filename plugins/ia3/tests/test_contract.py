"""(IA)³ against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestIA3Contract(DeltaMethodContract):
    method_name = "ia3"
    config = {}  # PEFT's defaults for the family: k_proj, v_proj, down_proj (feedforward) on Llama
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
    config = {"targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "feedforward": ["down_proj"]}
    tiny_overrides = {"attention_bias": True, "mlp_bias": True}
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}
    compose_with = {"name": "bitfit"}  # BitFit trains the biases IA3 scales: the merge must fold both
