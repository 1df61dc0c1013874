"""LOMO against deltatune's optimizer contract (``deltatune.testing``): an optimizer that updates
inside backward is driven through ``backward_and_update`` by the contract, as by the core."""

from deltatune.testing import OptimizerContract


class TestLomoContract(OptimizerContract):
    optimizer_name = "lomo"
    config = {"lr": 0.05, "warmup_steps": 2}


class TestLomoClippedContract(OptimizerContract):
    optimizer_name = "lomo"
    config = {"lr": 0.05, "clip_grad_norm": 5.0, "weight_decay": 0.01, "min_lr_ratio": 1.0}
