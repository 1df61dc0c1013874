"""The adamw optimizer against deltatune's optimizer contract (``deltatune.testing``)."""

from deltatune.testing import OptimizerContract


class TestAdamWContract(OptimizerContract):
    optimizer_name = "adamw"
    config = {"lr": 0.1, "warmup_steps": 3, "weight_decay": 0.01}


class TestAdamWConstantContract(OptimizerContract):
    optimizer_name = "adamw"
    config = {"lr": 0.1, "schedule": False}
