"""Bottleneck adapters against deltatune's delta-method contract (``deltatune.testing``)."""

from deltatune.testing import DeltaMethodContract


class TestHoulsbyAdapterContract(DeltaMethodContract):
    method_name = "adapter"
    config = {"placement": "houlsby", "bottleneck": 8, "nonlinearity": "gelu"}
    promises_identity_at_init = True  # up starts at zero
    quantizer = {"name": "nf4"}
    compose_with = {"name": "bitfit"}


class TestParallelAdapterContract(DeltaMethodContract):
    method_name = "adapter"
    config = {"placement": "parallel", "beside": ["mlp", "attention"], "bottleneck": 8, "scale": 2.0}
    promises_identity_at_init = True  # up starts at zero
    quantizer = {"name": "nf4"}
    compose_with = {"name": "lora", "config": {"targets": ["q_proj", "down_proj"]}}
