"""LoRA against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestLoraContract(DeltaMethodContract):
    method_name = "lora"
    config = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}
    promises_identity_at_init = True  # B starts at zero
    supports_nf4 = True
    compose_with = None  # LoRA is the usual partner; listed twice it must be refused


class TestRsLoraAllLinearContract(DeltaMethodContract):
    method_name = "lora"
    config = {"r": 8, "alpha": 4, "rslora": True, "dropout": 0.1, "targets": "all-linear"}
    promises_identity_at_init = True
    supports_nf4 = True
    compose_with = None
