"""AdaLomo against deltatune's optimizer contract (``deltatune.testing``): an optimizer that updates
inside backward is driven through ``backward_and_update`` by the contract, as by the core; its
factored statistics must survive a state-dict round trip."""

from deltatune.testing import OptimizerContract


class TestAdaLomoContract(OptimizerContract):
    optimizer_name = "adalomo"
    config = {"lr": 0.1, "min_lr_ratio": 1.0}


class TestAdaLomoClippedContract(OptimizerContract):
    optimizer_name = "adalomo"
    config = {"lr": 0.1, "clip_grad_norm": 1.0, "warmup_steps": 2, "min_lr_ratio": 0.5}
