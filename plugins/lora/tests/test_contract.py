"""LoRA against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestLoraContract(DeltaMethodContract):
    method_name = "lora"
    config = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}
    promises_identity_at_init = True  # B starts at zero
    quantizer = {"name": "nf4"}
    # no compose_with: LoRA is the usual partner of others; listed twice it must be refused


class TestRsLoraAllLinearContract(DeltaMethodContract):
    method_name = "lora"
    config = {"r": 8, "alpha": 4, "rslora": True, "dropout": 0.1, "targets": "all-linear"}
    promises_identity_at_init = True
    quantizer = {"name": "nf4"}


class TestPissaContract(DeltaMethodContract):
    method_name = "lora"
    config = {"r": 4, "alpha": 8, "init": "pissa", "targets": ["q_proj", "v_proj", "down_proj"]}
    promises_identity_at_init = True  # the residual plus the principal pair is the base weight
    # no quantizer: PiSSA needs a dense base (refused on nf4; test_principal_init checks the refusal)


class TestOLoraContract(DeltaMethodContract):
    method_name = "lora"
    config = {"r": 4, "alpha": 8, "init": "olora", "targets": "all-linear"}
    promises_identity_at_init = True
