"""Oracle tests of the ``lomo`` optimizer: lomo_optim.Lomo, torch SGD, clip_grad_norm_."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import lightning as L
import lomo_optim
import pytest
import torch
from deltatune.plugin.resolve import resolve
from deltatune.errors import ConfigError
from deltatune.train.update_in_backward import InBackwardOptimizer, optimizer_updates_in_backward
from deltatune.model.loading import tiny_llama
from deltatune.plugin.manager import PluginManager
from deltatune.testing import fast_forward_runs, max_parameter_difference as max_diff, token_batches
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deltatune_lomo
from deltatune_lomo import Config, Lomo, LomoOptimizer

STEPS = 4
LR = 0.1


def batches(n: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    return token_batches(n, seed)


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def sgd_reference(model: nn.Module, clip: float | None, weight_decay: float = 0.0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, weight_decay=weight_decay)
    for b in batches():
        loss_of(model, b).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def lomo_run(model: nn.Module, clip: float | None, weight_decay: float = 0.0) -> LomoOptimizer:
    opt = LomoOptimizer(model.named_parameters(), lr=LR, weight_decay=weight_decay, clip_grad_norm=clip)
    for b in batches():
        opt.backward_and_update(loss_of(model, b))
    return opt


@pytest.fixture
def base() -> nn.Module:
    return tiny_llama(seed=1).train()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is much faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_matches_lomo_optim_with_schedule(base: nn.Module, clip: float | None) -> None:
    """Same model, data and (scheduled) lr as the reference package lomo_optim.Lomo."""
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    cfg = Config(lr=LR, clip_grad_norm=clip, warmup_steps=1, min_lr_ratio=0.1)
    opt, sched = Lomo().create(list(ours.named_parameters()), cfg, total_steps=STEPS)
    assert sched is not None
    ref_opt = lomo_optim.Lomo(ref, lr=LR, clip_grad_norm=clip)
    lrs = []
    for b in batches():
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        opt.backward_and_update(loss_of(ours, b))
        sched.step()
        loss = loss_of(ref, b)
        if clip is not None:
            ref_opt.grad_norm(loss)
        ref_opt.fused_backward(loss, lr)
    assert len(set(lrs)) == STEPS  # the schedule really changed the lr every step
    assert max_diff(base, ours) > 1e-3  # it trained
    assert max_diff(ours, ref) < 1e-6


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_sgd(base: nn.Module, clip: float | None, weight_decay: float) -> None:
    """Without clipping LOMO is SGD; with clipping it is SGD after clip_grad_norm_."""
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = lomo_run(ours, clip, weight_decay)
    sgd_reference(ref, clip, weight_decay)
    assert max_diff(base, ours) > 1e-3
    assert max_diff(ours, ref) < 1e-6
    if clip is not None:
        assert opt.last_grad_norm is not None and opt.last_grad_norm > clip  # clipping was active


def test_after_load_state_dict_updates_use_the_scheduled_rate(base: nn.Module) -> None:
    """``load_state_dict`` replaces every param-group dict; the hooks must then read the new groups
    (the ones a scheduler drives), not the dicts of the moment the optimizer was built (a resumed
    warm-up otherwise stepped for ever at its first, tiny rate)."""
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = LomoOptimizer(ours.named_parameters(), lr=LR * 1e-3)
    opt.load_state_dict(LomoOptimizer(copy.deepcopy(base).named_parameters(), lr=LR).state_dict())
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 + step)
    reference = torch.optim.SGD(ref.parameters(), lr=LR)
    for step, b in enumerate(batches()):
        opt.backward_and_update(loss_of(ours, b))
        scheduler.step()
        loss_of(ref, b).backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
        reference.param_groups[0]["lr"] = LR * (step + 2)
    assert max_diff(ours, ref) < 1e-6


def test_clipping_cost_is_visible(base: nn.Module) -> None:
    plain = lomo_run(copy.deepcopy(base), None)
    clipped = lomo_run(copy.deepcopy(base), 0.5)
    n_params = len(list(base.parameters()))
    assert (plain.backward_passes, plain.norm_passes, plain.steps) == (STEPS, 0, STEPS)
    assert (clipped.backward_passes, clipped.norm_passes, clipped.steps) == (2 * STEPS, STEPS, STEPS)
    assert plain.param_updates == clipped.param_updates == STEPS * n_params
    assert all(not state for state in plain.state.values())  # LOMO keeps no optimizer state


class Recording(LomoOptimizer):
    """LOMO that records, at each update, the parameter and how many .grad are alive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updated: list[int] = []
        self.alive_grads: list[int] = []

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        self.updated.append(param.data_ptr())
        self.alive_grads.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        super()._update(param, grad, group, state)


def test_tied_weights_updated_exactly_once_per_step() -> None:
    base = tiny_llama(seed=2, tie_word_embeddings=True).train()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = Recording(ours.named_parameters(), lr=LR, clip_grad_norm=0.5)
    for b in batches():
        opt.backward_and_update(loss_of(ours, b))
    sgd_reference(ref, 0.5)
    tied = ours.model.embed_tokens.weight.data_ptr()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert opt.updated.count(tied) == STEPS
    n_params = len(list(ours.parameters()))  # named_parameters lists the tied weight once
    assert len(opt.updated) == STEPS * n_params
    # a double (or missed) update of the tied matrix would break the equality with SGD
    assert max_diff(ours, ref) < 1e-6


def labelled(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch`` as deltatune's loss takes it, with the first tokens of every row unlabelled."""
    labels = batch.clone()
    labels[:, :4] = -100
    return {"input_ids": batch, "labels": labels, "attention_mask": torch.ones_like(batch)}


def sgd_reference_token_loss(model: nn.Module, clip: float | None) -> None:
    """SGD on deltatune's loss computed the plain way: every logit, then cross-entropy."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    for b in batches():
        batch = labelled(b)
        logits, targets = model(input_ids=b).logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = targets != -100
        torch.nn.functional.cross_entropy(logits[mask], targets[mask]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_tied_head_gradient_is_deferred_to_the_end_of_backward(fast: bool, clip: float | None) -> None:
    """Through deltatune's loss (fast and plain path), a tied LM head's weight gradient is computed
    when backward reaches the embedding — after every other parameter is updated — and only then;
    the result is still exactly SGD's."""
    from deltatune.train import update_in_backward
    from deltatune.train.loss import token_loss

    base = tiny_llama(seed=2, tie_word_embeddings=True).train()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = Recording(ours.named_parameters(), lr=LR, clip_grad_norm=clip)
    tied = ours.model.embed_tokens.weight
    taken: list[int] = []
    take = update_in_backward.DeferredGrad.take

    def spy(self: update_in_backward.DeferredGrad) -> torch.Tensor | None:
        taken.append(len(opt.updated))
        return take(self)

    n_params = len(list(ours.parameters()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(update_in_backward.DeferredGrad, "take", spy)
        assert update_in_backward.deferred_tied_head(ours) is not None
        for b in batches():
            with fast_forward_runs() as runs:
                total, count = token_loss(ours, labelled(b), fast=fast)
            assert runs == (["llama"] if fast else [])  # the fast forward really computed it
            opt.backward_and_update(total / count)
    sgd_reference_token_loss(ref, clip)
    assert max_diff(ours, ref) < 1e-6
    passes = 2 if clip else 1
    assert len(taken) == STEPS * passes  # once per backward pass…
    updates = [n_params * (step // passes) + (n_params - 1 if step % passes == passes - 1 else 0)
               for step in range(STEPS * passes)]
    assert taken == updates  # …after every other parameter of that pass was updated (norm pass: none)
    assert opt.updated.count(tied.data_ptr()) == STEPS
    # nothing is deferred without an in-backward optimizer driving the tied weight
    assert update_in_backward.deferred_tied_head(ref) is None
    assert update_in_backward.deferred_tied_head(tiny_llama(seed=2)) is None  # untied


def test_loss_uses_lean_logits_chunks_when_an_in_backward_optimizer_trains_the_head() -> None:
    """The head's logits chunks shrink to FUSED_LOSS_CHUNK_BYTES only while an in-backward optimizer
    updates the head inside backward (memory is the point there), and are back once it lets go."""
    from deltatune.train import head_loss as loss

    model = tiny_llama(seed=2, tie_word_embeddings=True)
    head, vocab = model.get_output_embeddings(), model.config.vocab_size
    assert loss.head_chunk_rows(head) == loss.loss_chunk_rows(vocab, loss.LOSS_CHUNK_BYTES)
    opt = LomoOptimizer(model.named_parameters(), lr=LR)
    lean = loss.loss_chunk_rows(vocab, loss.FUSED_LOSS_CHUNK_BYTES)
    assert loss.head_chunk_rows(head) == lean < loss.loss_chunk_rows(vocab)
    opt.remove_hooks()
    assert loss.head_chunk_rows(head) == loss.loss_chunk_rows(vocab)


def test_gradients_are_freed_at_once(base: nn.Module) -> None:
    model = copy.deepcopy(base)
    opt = Recording(model.named_parameters(), lr=LR, clip_grad_norm=1.0)
    for b in batches(2):
        opt.backward_and_update(loss_of(model, b))
        assert all(p.grad is None for p in model.parameters())
    # when any parameter is updated, no other parameter holds a gradient
    assert opt.alive_grads and max(opt.alive_grads) == 0


def test_only_the_given_parameters_train(base: nn.Module) -> None:
    """As on top of a delta method: the optimizer gets (and changes) the trainable subset only."""
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    for m in (ours, ref):
        for name, p in m.named_parameters():
            p.requires_grad_("q_proj" in name or "norm" in name)
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    opt = LomoOptimizer(trainable, lr=LR, clip_grad_norm=0.5)
    for b in batches():
        opt.backward_and_update(loss_of(ours, b))
    sgd_reference(ref, 0.5)
    for (name, p), p0, q in zip(ours.named_parameters(), base.parameters(), ref.parameters()):
        if "q_proj" in name or "norm" in name:
            assert not torch.equal(p, p0), name
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, p0), name
    assert opt.param_updates == STEPS * len(trainable)


def test_activation_checkpointing_matches_sgd(base: nn.Module) -> None:
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    getattr(ours, "activation_checkpointing_enable", ours.gradient_checkpointing_enable)()
    lomo_run(ours, 0.5)
    sgd_reference(ref, 0.5)
    assert max_diff(ours, ref) < 1e-6


class SmallChunks(LomoOptimizer):
    """LOMO up-casting low-precision weights in slices of 1000 elements (matrices here have more)."""

    chunk_numel = 1000


@pytest.mark.parametrize("cls", [LomoOptimizer, SmallChunks])
def test_bf16_weights_update_in_fp32(base: nn.Module, cls: type[LomoOptimizer]) -> None:
    """bf16 weights: the gradient and weight are up-cast, updated in fp32 and rounded back once
    (whole, or slice by slice for large matrices: the result is the same bit for bit)."""
    model = copy.deepcopy(base).to(torch.bfloat16)
    probe = copy.deepcopy(model)
    b = batches(1)[0]
    loss_of(probe, b).backward()
    expected = [p.float().add(p.grad.float(), alpha=-LR).to(torch.bfloat16) for p in probe.parameters()]
    opt = cls(model.named_parameters(), lr=LR)
    opt.backward_and_update(loss_of(model, b))
    assert opt.backward_passes == 1  # bf16 needs no loss scaling and no norm pass
    for p, e in zip(model.parameters(), expected):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, e)
    # the naive bf16 update (p - lr * g in bf16) rounds twice and differs somewhere
    naive = [(p - LR * p.grad) for p in probe.parameters()]
    assert any(not torch.equal(n, e) for n, e in zip(naive, expected))


def test_fp16_uses_loss_scaling_and_skips_overflow(base: nn.Module) -> None:
    model = copy.deepcopy(base).half()
    opt = LomoOptimizer(model.named_parameters(), lr=LR)
    b = batches(1)[0]
    opt.backward_and_update(loss_of(model, b))
    assert (opt.backward_passes, opt.norm_passes, opt.steps) == (2, 1, 1)  # norm pass = overflow check
    assert opt.loss_scale == 2.0**16
    snapshot = copy.deepcopy(model)
    opt.backward_and_update(loss_of(model, b) * 1e5)  # scaled gradients overflow fp16
    assert (opt.skipped_steps, opt.steps, opt.loss_scale) == (1, 1, 2.0**15)
    assert max_diff(model, snapshot) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_trainer_settings_that_cannot_work_are_errors() -> None:
    Lomo.check_trainer_compatible(1)
    LomoOptimizer.check_trainer_compatible(accumulate_grad_batches=1, gradient_clip_val=None, world_size=1)
    with pytest.raises(ValueError, match=r"'lomo'.*accumulate_grad_batches=4"):
        Lomo.check_trainer_compatible(accumulate_grad_batches=4)
    with pytest.raises(ValueError, match=r"'lomo'.*gradient_clip_val=1.0.*clip_grad_norm"):
        Lomo.check_trainer_compatible(1, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"'lomo'.*world_size=2"):
        Lomo.check_trainer_compatible(1, world_size=2)
    with pytest.raises(ValueError, match=r"'lomo'.*precision='16-mixed'.*16-true"):
        Lomo.check_trainer_compatible(1, precision="16-mixed")
    Lomo.check_trainer_compatible(1, precision="bf16-mixed")


def test_step_and_plain_backward_explain_the_in_backward_api(base: nn.Module) -> None:
    model = copy.deepcopy(base)
    opt = LomoOptimizer(model.named_parameters(), lr=LR, clip_grad_norm=1.0)
    assert optimizer_updates_in_backward(opt) and isinstance(opt, InBackwardOptimizer)
    with pytest.raises(RuntimeError, match="backward_and_update"):
        opt.step()
    with pytest.raises(RuntimeError, match="did not call backward_and_update"):
        opt.step(closure=lambda: None)
    with pytest.raises(RuntimeError, match="backward_and_update"):
        loss_of(model, batches(1)[0]).backward()  # clipping cannot happen in a plain backward
    # without clipping a plain backward is one SGD step inside backward
    plain = copy.deepcopy(base)
    LomoOptimizer(plain.named_parameters(), lr=LR)
    ref = copy.deepcopy(base)
    loss_of(plain, batches(1)[0]).backward()
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    loss_of(ref, batches(1)[0]).backward()
    sgd.step()
    assert max_diff(plain, ref) < 1e-6
    assert all(p.grad is None for p in plain.parameters())


def test_registered_and_config_validated() -> None:
    pm = PluginManager()
    pm.register_module(deltatune_lomo, distribution="deltatune-lomo")
    assert pm.get("optimizer", "lomo").cls is Lomo
    resolved = resolve("optimizer", {"name": "lomo", "config": {"lr": 0.01, "clip_grad_norm": 1.0}}, pm)
    assert resolved.cfg == Config(lr=0.01, clip_grad_norm=1.0)
    with pytest.raises(ConfigError, match="momentum"):
        resolve("optimizer", {"name": "lomo", "config": {"momentum": 0.9}}, pm)
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        resolve("optimizer", {"name": "lomo", "config": {"clip_grad_norm": 0}}, pm)


def test_a_new_optimizer_takes_over_hooked_parameters(base: nn.Module) -> None:
    """Re-creating the optimizer (Lightning may call configure_optimizers again) must not leave the
    old hooks behind: every parameter is still updated exactly once per step."""
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    first = LomoOptimizer(model.named_parameters(), lr=LR)
    with pytest.warns(UserWarning, match="'lomo'.*no longer"):
        second = LomoOptimizer(model.named_parameters(), lr=LR)
    for b in batches():
        second.backward_and_update(loss_of(model, b))
    sgd_reference(ref, None)
    assert first.param_updates == 0
    assert max_diff(model, ref) < 1e-6
    second.remove_hooks()
    before = copy.deepcopy(model)
    loss_of(model, batches(1)[0]).backward()  # a detached optimizer no longer updates
    assert max_diff(model, before) == 0.0
    assert all(p.grad is not None for p in model.parameters())


class ManualModule(L.LightningModule):
    """The way a Lightning module drives an in-backward optimizer: manual optimisation, step(closure)."""

    def __init__(self, model: nn.Module, clip: float | None) -> None:
        super().__init__()
        self.model, self.clip = model, clip
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        cfg = Config(lr=LR, clip_grad_norm=self.clip, min_lr_ratio=1.0)  # constant lr
        opt, sched = Lomo().create(list(self.model.named_parameters()), cfg, total_steps=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss = loss_of(self.model, batch[0])
        opt = self.optimizers()
        opt.step(closure=lambda: opt.optimizer.backward_and_update(loss))
        self.lr_schedulers().step()


@pytest.mark.parametrize("clip", [None, 0.5])
def test_lightning_manual_optimisation_counts_steps_and_matches_sgd(base: nn.Module, clip: float | None) -> None:
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    module = ManualModule(ours, clip)
    data = DataLoader(TensorDataset(torch.cat(batches())), batch_size=2, shuffle=False)
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    assert trainer.global_step == STEPS  # step(closure) is what Lightning counts
    opt = module.optimizers().optimizer
    assert opt.steps == STEPS and opt.backward_passes == (2 if clip else 1) * STEPS
    sgd_reference(ref, clip)
    assert max_diff(ours, ref) < 1e-6
