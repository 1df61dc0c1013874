"""DoRA against deltatune's delta-method contract (``deltatune.testing``). (rsLoRA scaling and the
dropout path are checked against PEFT in test_dora.py.)"""

from deltatune.testing import DeltaMethodContract


class TestDoraContract(DeltaMethodContract):
    method_name = "dora"
    config = {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "down_proj"]}  # not o_proj: LoRA composes there
    promises_identity_at_init = True  # B starts at zero and m at ||W||
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["o_proj"]}}
