"""The adamw optimizer against deltatune's optimizer contract (``deltatune.testing``)."""

from deltatune.testing import OptimizerContract


class TestAdamWContract(OptimizerContract):
    optimizer_name = "adamw"
    config = {"lr": 0.1, "warmup_steps": 3, "weight_decay": 0.01}


class TestAdamWConstantContract(OptimizerContract):
    optimizer_name = "adamw"
    config = {"lr": 0.1, "schedule": False}


def test_fused_step_equals_the_reference_adamw():
    """The default (fused kernel) takes the same steps as torch's per-parameter AdamW."""
    import torch

    from deltatune.plugin.resolve import resolve

    torch.manual_seed(0)
    params = [torch.randn(8, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    reference = [p.detach().clone().requires_grad_() for p in params]
    plugin = resolve("optimizer", {"name": "adamw", "config": {"lr": 0.05, "weight_decay": 0.1, "schedule": False}})
    ours, _ = plugin.plugin.create([("w", params[0]), ("b", params[1])], plugin.cfg, 10)
    assert ours.defaults["fused"] is True
    theirs = torch.optim.AdamW([{"params": [reference[0]], "weight_decay": 0.1},
                                {"params": [reference[1]], "weight_decay": 0.0}], lr=0.05, foreach=False)
    for step in range(5):
        for group in (params, reference):
            loss = sum((p ** 2).sum() * (step + 1) for p in group)
            loss.backward()
        ours.step(), theirs.step()
        ours.zero_grad(), theirs.zero_grad()
    for a, b in zip(params, reference):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    off = resolve("optimizer", {"name": "adamw", "config": {"fused": False}})
    assert not off.plugin.create([("w", params[0])], off.cfg, 10)[0].defaults["fused"]
