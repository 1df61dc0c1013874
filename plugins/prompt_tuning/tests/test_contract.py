"""Prompt tuning and P-tuning against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestPromptTuningContract(DeltaMethodContract):
    method_name = "prompt_tuning"
    config = {"num_virtual_tokens": 4}
    promises_identity_at_init = False  # the virtual tokens are attended to from the start
    quantizer = {"name": "nf4"}  # the embeddings never read a base weight
    compose_with = {"name": "lora", "config": {"targets": ["q_proj", "v_proj"]}}


class TestPTuningMLPContract(DeltaMethodContract):
    method_name = "p_tuning"
    config = {"num_virtual_tokens": 3, "encoder_hidden_size": 16}
    promises_identity_at_init = False
    saves_computed = True  # the prompt encoder is dropped at save: the bundle holds the computed embeddings
    compose_with = {"name": "bitfit"}
    tiny_overrides = {"attention_bias": True}


class TestPTuningLSTMContract(DeltaMethodContract):
    method_name = "p_tuning"
    config = {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8}
    promises_identity_at_init = False
    saves_computed = True
