"""LOMO against deltatune's optimizer contract (``deltatune.testing``): a fused optimizer is driven
through ``fused_backward`` by the contract, as by the core."""

import pytest

from deltatune.testing import OptimizerContract


class TestLomoContract(OptimizerContract):
    optimizer_name = "lomo"
    config = {"lr": 0.05, "warmup_steps": 2}

    @pytest.mark.xfail(strict=True, reason="known bug, found by this contract: after load_state_dict a resumed fused optimizer takes a different step than the original when a warm-up schedule is active (see the closing note)")
    def test_state_dict_resumes_identically(self, manager) -> None:
        super().test_state_dict_resumes_identically(manager)


class TestLomoClippedContract(OptimizerContract):
    optimizer_name = "lomo"
    config = {"lr": 0.05, "clip_grad_norm": 5.0, "weight_decay": 0.01, "min_lr_ratio": 1.0}
