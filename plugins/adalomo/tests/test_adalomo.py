"""Oracle tests of the ``adalomo`` optimizer: transformers' Adafactor and lomo_optim.AdaLomo."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from deltatune.plugin.resolve import resolve
from deltatune.errors import ConfigError
from deltatune.train.update_in_backward import optimizer_updates_in_backward
from deltatune.model.loading import tiny_llama
from deltatune.plugin.manager import PluginManager
from deltatune.testing import max_parameter_difference as max_diff, token_batches
from torch import nn
from transformers.optimization import Adafactor

import deltatune_adalomo
from deltatune_adalomo import AdaLomo, AdaLomoOptimizer, Config

STEPS = 5
LR = 1e-2


def batches(n: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    return token_batches(n, seed)


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def adafactor(params: list[nn.Parameter], weight_decay: float = 0.0, **overrides: Any) -> Adafactor:
    """The Adafactor configuration AdaLomo is claimed to equal."""
    options: dict[str, Any] = dict(
        lr=LR,
        beta1=None,
        relative_step=False,
        scale_parameter=True,
        warmup_init=False,
        eps=(1e-30, 1e-3),
        decay_rate=-0.8,
        clip_threshold=1.0,
        weight_decay=weight_decay,
    )
    options.update(overrides)
    return Adafactor(params, **options)


def adafactor_run(
    model: nn.Module, clip: float | None, weight_decay: float = 0.0, lrs: list[float] | None = None, **overrides: Any
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adafactor(params, weight_decay, **overrides)
    for i, b in enumerate(batches()):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        loss_of(model, b).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def adalomo_run(model: nn.Module, clip: float | None, weight_decay: float = 0.0, cls: type = AdaLomoOptimizer) -> Any:
    opt = cls(model.named_parameters(), lr=LR, weight_decay=weight_decay, clip_grad_norm=clip)
    for b in batches():
        opt.backward_and_update(loss_of(model, b))
    return opt


@pytest.fixture
def base() -> nn.Module:
    return tiny_llama(seed=3).train()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is much faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_adafactor(base: nn.Module, clip: float | None, weight_decay: float) -> None:
    """AdaLomo == Adafactor(beta1=None, relative_step=False, scale_parameter=True, …) over several
    steps; with clip_grad_norm, == that Adafactor after clip_grad_norm_."""
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = adalomo_run(ours, clip, weight_decay)
    adafactor_run(ref, clip, weight_decay)
    assert max_diff(base, ours) > 1e-2  # it trained
    assert max_diff(ours, ref) < 1e-5
    assert opt.backward_passes == (2 if clip else 1) * STEPS


def test_equivalence_is_specific(base: nn.Module) -> None:
    """The oracle can tell: Adafactor with a first moment, without parameter scaling, or with a
    different update-clipping threshold is a different optimizer."""
    ours = copy.deepcopy(base)
    adalomo_run(ours, None)
    for overrides in ({"beta1": 0.9}, {"scale_parameter": False}, {"clip_threshold": 0.5}):
        ref = copy.deepcopy(base)
        adafactor_run(ref, None, **overrides)
        assert max_diff(ours, ref) > 1e-4, overrides


def test_schedule_from_create_matches_adafactor_with_same_lrs(base: nn.Module) -> None:
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt, sched = AdaLomo().create(list(ours.named_parameters()), Config(lr=LR, warmup_steps=2), total_steps=STEPS)
    assert sched is not None
    lrs = []
    for b in batches():
        lrs.append(opt.param_groups[0]["lr"])
        opt.backward_and_update(loss_of(ours, b))
        sched.step()
    assert len(set(lrs)) == STEPS
    adafactor_run(ref, None, lrs=lrs)
    assert max_diff(ours, ref) < 1e-5


@pytest.mark.parametrize("clip", [None, 0.5])
def test_matches_lomo_optim_adalomo(base: nn.Module, clip: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also equal to the authors' lomo_optim.AdaLomo (which allocates its state with ``.cuda()``;
    on this CPU-only test that call is made a no-op while the reference is built)."""
    import lomo_optim

    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    adalomo_run(ours, clip, weight_decay=0.1)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        ref_opt = lomo_optim.AdaLomo(ref, lr=LR, weight_decay=0.1, clip_grad_norm=clip)
    for b in batches():
        loss = loss_of(ref, b)
        if clip is not None:
            ref_opt.grad_norm(loss)
        ref_opt.fused_backward(loss, LR)
    assert max_diff(ours, ref) < 1e-5


class Recording(AdaLomoOptimizer):
    """AdaLomo that records which parameter is updated and how many .grad are alive then."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updated: list[int] = []
        self.alive_grads: list[int] = []

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        self.updated.append(param.data_ptr())
        self.alive_grads.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        super()._update(param, grad, group, state)


def test_tied_weights_updated_exactly_once_per_step() -> None:
    base = tiny_llama(seed=4, tie_word_embeddings=True).train()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = adalomo_run(ours, 0.5, cls=Recording)
    adafactor_run(ref, 0.5)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    tied = ours.model.embed_tokens.weight
    assert opt.updated.count(tied.data_ptr()) == STEPS
    assert opt.state[tied]["step"] == STEPS  # one update, hence one statistics step, per step
    assert len(opt.updated) == STEPS * len(list(ours.parameters()))
    assert max_diff(ours, ref) < 1e-5


def test_state_is_only_factored_statistics(base: nn.Module) -> None:
    model = copy.deepcopy(base)
    opt = adalomo_run(model, None)
    expected = 0
    for p in model.parameters():
        state = opt.state[p]
        if p.dim() >= 2:
            assert set(state) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
            assert state["exp_avg_sq_row"].shape == p.shape[:-1]
            assert state["exp_avg_sq_col"].shape == p.shape[:-2] + p.shape[-1:]
            expected += p.shape[0] + p.shape[1]
        else:
            assert set(state) == {"step", "exp_avg_sq"}
            expected += p.numel()
    held = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert held == expected
    assert held < 0.1 * sum(p.numel() for p in model.parameters())


def test_gradients_are_freed_at_once(base: nn.Module) -> None:
    model = copy.deepcopy(base)
    opt = Recording(model.named_parameters(), lr=LR, clip_grad_norm=1.0)
    for b in batches(2):
        opt.backward_and_update(loss_of(model, b))
        assert all(p.grad is None for p in model.parameters())
    assert opt.alive_grads and max(opt.alive_grads) == 0


def test_only_the_given_parameters_train(base: nn.Module) -> None:
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    for m in (ours, ref):
        for name, p in m.named_parameters():
            p.requires_grad_("v_proj" in name or "norm" in name)
    opt = AdaLomoOptimizer([(n, p) for n, p in ours.named_parameters() if p.requires_grad], lr=LR)
    for b in batches():
        opt.backward_and_update(loss_of(ours, b))
    adafactor_run(ref, None)
    for (name, p), p0, q in zip(ours.named_parameters(), base.parameters(), ref.parameters()):
        if "v_proj" in name or "norm" in name:
            assert not torch.equal(p, p0), name
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
        else:
            assert torch.equal(p, p0), name
    assert len(opt.state) == sum(p.requires_grad for p in ours.parameters())


def test_bf16_weights_match_adafactor_in_bf16(base: nn.Module) -> None:
    """bf16 weights: the math runs in fp32 (as Adafactor does for bf16) and is written back once."""
    ours, ref = copy.deepcopy(base).to(torch.bfloat16), copy.deepcopy(base).to(torch.bfloat16)
    opt = AdaLomoOptimizer(ours.named_parameters(), lr=LR)
    b = batches(1)[0]
    opt.backward_and_update(loss_of(ours, b))
    ref_opt = adafactor([p for p in ref.parameters()])
    loss_of(ref, b).backward()
    ref_opt.step()
    assert opt.backward_passes == 1
    differing = 0
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), base.parameters()):
        assert p.dtype == torch.bfloat16
        assert not torch.equal(p, p0.to(torch.bfloat16))
        # at most one bf16 rounding step apart where the fp32 results straddle a rounding boundary
        torch.testing.assert_close(p, q, rtol=2**-7, atol=1e-6)
        differing += int((p != q).sum())
    # fp32 math differs from Adafactor's only in operation order: almost every element is identical
    # (math done in bf16 instead changes about 1% of them)
    assert differing <= 1e-3 * sum(p.numel() for p in ours.parameters())
    assert all(s["exp_avg_sq_row"].dtype == torch.float32 for s in opt.state.values() if "exp_avg_sq_row" in s)


def test_state_dict_round_trip_continues_identically(base: nn.Module) -> None:
    first, second = copy.deepcopy(base), None
    opt = AdaLomoOptimizer(first.named_parameters(), lr=LR)
    data = batches(4)
    for b in data[:2]:
        opt.backward_and_update(loss_of(first, b))
    second = copy.deepcopy(first)
    opt2 = AdaLomoOptimizer(second.named_parameters(), lr=LR)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.steps == 2
    for b in data[2:]:
        opt.backward_and_update(loss_of(first, b))
        opt2.backward_and_update(loss_of(second, b))
    assert max_diff(first, second) == 0.0


def test_trainer_settings_that_cannot_work_are_errors(base: nn.Module) -> None:
    AdaLomo.check_trainer_compatible(1)
    with pytest.raises(ValueError, match=r"'adalomo'.*accumulate_grad_batches=8"):
        AdaLomo.check_trainer_compatible(accumulate_grad_batches=8)
    with pytest.raises(ValueError, match=r"'adalomo'.*gradient_clip_val=0.5"):
        AdaLomo.check_trainer_compatible(1, gradient_clip_val=0.5)
    opt = AdaLomoOptimizer(base.named_parameters(), lr=LR)
    assert optimizer_updates_in_backward(opt)
    with pytest.raises(ValueError, match=r"'adalomo'.*world_size=4"):
        type(opt).check_trainer_compatible(1, world_size=4)
    with pytest.raises(RuntimeError, match="backward_and_update"):
        opt.step()


def test_registered_and_config_validated() -> None:
    pm = PluginManager()
    pm.register_module(deltatune_adalomo, distribution="deltatune-adalomo")
    assert pm.get("optimizer", "adalomo").cls is AdaLomo
    resolved = resolve("optimizer", {"name": "adalomo", "config": {"lr": 5e-4, "eps": [1e-30, 1e-3]}}, pm)
    assert resolved.cfg == Config(lr=5e-4)
    with pytest.raises(ConfigError, match="beta1"):
        resolve("optimizer", {"name": "adalomo", "config": {"beta1": 0.9}}, pm)
    with pytest.raises(ConfigError, match="decay_rate"):
        resolve("optimizer", {"name": "adalomo", "config": {"decay_rate": 0.8}}, pm)


def test_statistics_stay_fp32_for_bf16_weights_across_a_checkpoint(base: nn.Module) -> None:
    """torch casts optimizer state to the parameter dtype on load; AdaLomo's statistics stay fp32."""
    model = copy.deepcopy(base).to(torch.bfloat16)
    opt = AdaLomoOptimizer(model.named_parameters(), lr=LR)
    opt.backward_and_update(loss_of(model, batches(1)[0]))
    restored = copy.deepcopy(model)
    opt2 = AdaLomoOptimizer(restored.named_parameters(), lr=LR)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), restored.parameters()):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                loaded = opt2.state[q][key]
                assert loaded.dtype == torch.float32, key
                assert torch.equal(loaded, value), key
