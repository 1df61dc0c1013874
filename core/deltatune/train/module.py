"""``DeltaTuneModule``: the LightningModule that trains a base model with plugins.

Construction resolves every plugin and validates every option — before any weight is loaded — so a
typo in a YAML file fails in a second with a message naming the plugin and the field.
``configure_model`` then loads the base and applies quantizer → delta methods (in the listed order)
→ freezes what no method claims. The optimizer plugin builds the optimizer; an optimizer that
updates inside backward (:class:`~deltatune.train.update_in_backward.InBackwardOptimizer`) switches the
module to manual optimisation.

Checkpoints hold only the trainable tensors (and delta buffers), a small fraction of the base's size;
resuming rebuilds the frozen base from its source.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from deltatune.ui import console
from deltatune.io.adapter import adapter_state, save_adapter
from deltatune.io.peft import build_with_peft_init, resolve_with_peft_init
from deltatune.plugin.resolve import PluginRef, ResolvedPlugin, coerce_ref, default_name, resolve
from deltatune.errors import ConfigError, check_option
from deltatune.train.update_in_backward import InBackwardOptimizer
from deltatune.evaluation.helpers import EvaluatorRef
from deltatune.model.generation import generate, user_text
from deltatune.train.loss import token_loss
from deltatune.train.heap import release_freed_heap
from deltatune.model.loading import DEFAULT_MODEL
from deltatune.deltas.virtual import check_checkpointing
from deltatune.model.assembly import (DType, ModelSpec, ResolvedSpec, check_on_skeleton, compile_decoder_layers, compute_context,
                                      eval_mode,
                                      trainable_summary)
from deltatune.train.packing_check import packing_problem
from deltatune.train import resume
from deltatune.train.report import PLOT_FILE, REPORT_FILE, RunReport, plot_losses


def declared_lr_multipliers(resolved: ResolvedSpec) -> dict[str, dict[str, float]]:
    """Each delta method's learning-rate factors (``lr_multipliers``), by method, where it declares any."""
    declared = {}
    for delta in resolved.deltas:
        member = delta.optional("lr_multipliers")
        factors = member(delta.cfg) if member is not None else {}
        if any(factor != 1.0 for factor in factors.values()):
            declared[delta.name] = factors
    return declared


def check_lr_multipliers(resolved: ResolvedSpec, optimizer: ResolvedPlugin) -> None:
    """Raise :class:`ConfigError` when a delta method gives some parameters their own learning rate and
    the optimizer cannot honour it (checked before any weight loads)."""
    declared = declared_lr_multipliers(resolved)
    if declared and not optimizer.optional("honours_lr_multipliers"):
        methods = ", ".join(f"'{name}' ({factors})" for name, factors in declared.items())
        raise ConfigError(f"delta method {methods} trains some parameters at a multiple of the learning rate, "
                          f"which optimizer '{optimizer.name}' does not support; use an optimizer that does or "
                          "drop the option")


def lr_multipliers(resolved: ResolvedSpec, named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, float]:
    """Parameter name -> learning-rate factor, for the trainable parameters whose delta method declares
    one other than 1 (matched on the end of the name, among the parameters the method claims)."""
    out: dict[str, float] = {}
    declared = declared_lr_multipliers(resolved)
    for delta in resolved.deltas:
        for suffix, factor in declared.get(delta.name, {}).items():
            for name, param in named:
                if name.endswith(suffix) and delta.plugin.trainable(name, param):
                    out[name] = float(factor)
    return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far, in GiB: allocated by torch on a CUDA device, the resident
    set size (RSS) of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def logged_metrics(phase: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """A report's evaluation results as logger metrics: ``PHASE/SET/evaluator/metric`` (``base`` before
    training, ``tuned`` after), every metric of every evaluation set, per family where an evaluator gives one."""
    return {f"{phase}/{split}/{name}": value for split, values in metrics.items() for name, value in values.items()}


class DeltaTuneModule(L.LightningModule):
    """Fine-tunes ``base`` with the given quantizer, delta methods and optimizer plugins."""

    def __init__(
        self,
        base: str = DEFAULT_MODEL,
        delta: list[PluginRef] | None = None,
        quantizer: PluginRef | None = None,
        optimizer: PluginRef | None = None,
        evaluators: list[EvaluatorRef] | None = None,
        base_dtype: DType = "auto",
        trainable_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
        fast_path: bool = True,
        compile: bool = False,
        trust_remote_code: bool = False,
        compare_base: bool = True,
        samples: int = 3,
        max_new_tokens: int = 48,
        adapter_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Resolve and validate every plugin; no weight is loaded here.

        Args:
            base: built-in model name, local Hugging Face folder or ``.gguf`` file.
            delta: delta methods in the order they are applied; none means full fine-tuning.
            quantizer: quantizer applied to the base before the delta methods.
            optimizer: optimizer plugin (default ``adamw``).
            evaluators: evaluators run before and after ``fit`` and by ``validate``/``test``; each on
                every evaluation set (validation, test, ``data.extra_eval`` sets) or on its ``splits``.
                Unset: the default evaluator; an empty list: none.
            base_dtype: dtype of the frozen weights (``auto``: bf16 where the hardware supports it).
            trainable_dtype: dtype of the trained weights (``fp32`` or ``bf16``).
            gradient_checkpointing: recompute activations in backward to save memory.
            fast_path: compute the loss with the model family's fast forward where it applies (Llama-family
                decoders: unpadded tokens, fused LoRA; same loss and gradients); ``false`` always runs
                the plain Hugging Face forward.
            compile: compile every decoder layer with ``torch.compile`` (dynamic shapes) and train
                through the plain Hugging Face forward, compiled, instead of the hand-fused fast path.
                The first steps pay the compilation; which is faster depends on the method and model
                (docs/benchmarks.md compares them).
            trust_remote_code: allow a local model folder's own Python code (off by default).
            compare_base: evaluate the untouched base before training, for the final table.
            samples: how many validation prompts to generate for in the final report.
            max_new_tokens: generation length for samples.
            adapter_dir: where ``fit`` writes the adapter (default ``<default_root_dir>/adapter``).
            overwrite: start over in a run folder that holds an earlier run's checkpoints and adapter
                (they are replaced); without it such a run is refused unless it resumes (``--ckpt_path``).
                A folder deltatune did not write is never replaced.
        """
        super().__init__()
        check_option("model.samples", samples, samples >= 0, "must be 0 (no samples) or more")
        check_option("model.max_new_tokens", max_new_tokens, max_new_tokens >= 1, "must be at least 1")
        self.save_hyperparameters()
        self.resolved = resolve_with_peft_init(
            ModelSpec(base=base, quantizer=quantizer, delta=delta or [], base_dtype=base_dtype,
                      trainable_dtype=trainable_dtype, trust_remote_code=trust_remote_code)
        )
        self.optimizer_plugin: ResolvedPlugin = resolve("optimizer", coerce_ref(optimizer or default_name("optimizer")))
        refs = [e if isinstance(e, EvaluatorRef) else EvaluatorRef.model_validate(e)
                for e in (evaluators if evaluators is not None else [default_name("evaluator")])]
        self.evaluator_plugins = [resolve("evaluator", PluginRef(name=e.name, config=e.config)) for e in refs]
        self.evaluator_splits = [e.splits for e in refs]
        skeleton = check_on_skeleton(self.resolved)  # the base's config, not its weights: after every plugin option
        for delta in self.resolved.deltas:
            if delta.optional("adds_virtual_tokens"):
                check_checkpointing(skeleton.get_decoder(), delta.name, enabled=gradient_checkpointing)
        check_lr_multipliers(self.resolved, self.optimizer_plugin)
        self.updates_in_backward: bool = self.optimizer_plugin.optional("updates_in_backward")
        self.automatic_optimization = not self.updates_in_backward
        self.strict_loading = False
        self.model: torch.nn.Module | None = None
        self.report = RunReport()
        self._val_sums = [0.0, 0]
        self._window: list[Any] = [torch.zeros((), dtype=torch.float64), 0]  # (summed loss, tokens) of the step's micro-batches
        self._clock: dict[str, float] = {}
        self._resumed: dict[str, Any] | None = None

    # -- model --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base and apply quantizer and delta methods (once)."""
        if self.model is not None:
            return
        self.model = build_with_peft_init(self.resolved)
        self.model.train()
        if self.hparams.gradient_checkpointing:
            # the training loss asks for no KV cache itself (losses.hidden_states); the config keeps
            # use_cache, so a full fine-tune saves (and exports) a model that generates with its cache
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.hparams.get("compile", False):
            compile_decoder_layers(self.model)

    def trainable_state_keys(self) -> set[str]:
        """Keys (under ``model.``) of everything a checkpoint must hold."""
        if self.resolved.full_finetune:
            return {f"model.{k}" for k in self.model.state_dict()}
        # what the adapter saves, and the trained parameters it may save only computed (an encoder of virtual tokens)
        trained = {name for name, param in self.model.named_parameters() if param.requires_grad}
        keys = set(self.model.state_dict())
        return {f"model.{k}" for k in (set(adapter_state(self.model, self.resolved)) | trained) & keys}

    def adapter_path(self, root: str | Path) -> Path:
        """Where ``fit`` writes the adapter for a run folder ``root``."""
        return Path(self.hparams.adapter_dir) if self.hparams.get("adapter_dir") else Path(root) / "adapter"

    def run_spec(self) -> dict[str, Any]:
        """The spec a checkpoint of this run records (:func:`deltatune.train.resume.run_spec`)."""
        return resume.run_spec(self.resolved, self.optimizer_plugin.name)

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint written for another spec (and, once the model is built, other tensors)."""
        keys = self.trainable_state_keys() if self.model is not None else set(checkpoint.get("state_dict", {}))
        resume.check_resume(checkpoint, self.run_spec(), keys, source)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors and delta buffers in checkpoints, and add the run record."""
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[resume.RECORD] = resume.run_record(self.run_spec(), self.report)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another spec before its tensors load; keep its run record for resuming."""
        self.check_checkpoint(checkpoint, str(self._trainer.ckpt_path) if self._trainer else "the checkpoint")
        self._resumed = checkpoint.get(resume.RECORD)

    @property
    def uses_fast_path(self) -> bool:
        """Whether the loss may take the model family's fast forward (``compile`` runs the compiled plain forward)."""
        return self.hparams.get("fast_path", True) and not self.hparams.get("compile", False)

    # -- steps --------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed token loss and token count, in the base's compute dtype."""
        with compute_context(self.model):
            return token_loss(self.model, batch, fast=self.uses_fast_path)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """The loss of one micro-batch; with an optimizer that updates inside backward, backward and update
        happen here.

        An optimizer step's loss is the mean over every labelled token of its whole window: every
        micro-batch it accumulates (``trainer.accumulate_grad_batches``) on every process (DDP). That
        count is known only once the window is over, so, as torchtune does, each micro-batch backpropagates
        its *summed* token loss and :meth:`on_before_optimizer_step` rescales the accumulated gradient by
        the window's global token count (one all-reduce per step): the step's gradient is then exactly
        the one of a single process holding all those rows in one batch, however the tokens fall across
        micro-batches and ranks (a mean of per-micro-batch means would weigh a token of a short
        micro-batch more). An optimizer that updates inside backward takes no accumulation (it is
        refused), so its loss is the micro-batch's token mean over every rank, before its backward.
        """
        total, count = self.forward_loss(batch)
        if not self.updates_in_backward:
            self._window[0] = self._window[0] + total.detach().double()  # no sync with the device here
            self._window[1] += count
            return total
        world = self.trainer.world_size if self._trainer is not None else 1
        tokens = float(count)
        if world > 1:
            tokens = float(self.trainer.strategy.reduce(torch.tensor(tokens, device=total.device), reduce_op="sum"))
        loss = total * world / max(tokens, 1.0)
        mean = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean") if world > 1 else loss.detach()
        optimizer = self.optimizers()
        self.log_step(float(mean), tokens, optimizer.optimizer)
        # step(closure) lets Lightning count the step (global_step, max_steps) for an update inside backward
        optimizer.step(closure=lambda: optimizer.optimizer.backward_and_update(loss))
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of summed token losses into that of the window's token mean.

        Lightning divided each micro-batch's loss by ``accumulate_grad_batches`` and DDP averaged the
        gradients over the ranks, so the factor is ``accumulate_grad_batches x world size / tokens``,
        with ``tokens`` the labelled tokens of the window on every rank (:meth:`training_step`).
        """
        if self.updates_in_backward:
            return
        sums = torch.stack([self._window[0].detach(), self._window[0].new_tensor(float(self._window[1]))])
        self._window = [torch.zeros((), dtype=torch.float64), 0]
        world = self.trainer.world_size
        if world > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        loss_sum, tokens = float(sums[0]), max(float(sums[1]), 1.0)
        factor = self.trainer.accumulate_grad_batches * world / tokens
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(factor)
        self.log_step(loss_sum / tokens, tokens, optimizer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """On the CPU, hand the heap memory the micro-batch freed back to the system
        (:func:`deltatune.train.heap.release_freed_heap`): the next one starts from live memory."""
        if self.device.type == "cpu":
            release_freed_heap()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Start the clock of an optimizer step at its first micro-batch (for ``tokens_per_s``)."""
        self._clock.setdefault("step", time.perf_counter())

    def log_step(self, mean: float, tokens: float, optimizer: torch.optim.Optimizer) -> None:
        """Log what the step being taken measured, to the progress bar and every configured logger:
        ``train_loss`` (its global token mean, also recorded for the report), ``lr`` (of the first
        parameter group), ``tokens_per_s`` (labelled tokens of the step on every rank, per second since its
        first micro-batch began) and ``peak_memory_gib`` (:func:`peak_memory_gib`)."""
        self.log("train_loss", mean, prog_bar=True, batch_size=1)
        self.report.history["train"].append((self.global_step + 1, mean))
        seconds = time.perf_counter() - self._clock.pop("step", time.perf_counter())
        stats = {"lr": float(optimizer.param_groups[0]["lr"]), "peak_memory_gib": peak_memory_gib(self.device)}
        if seconds > 0:
            stats["tokens_per_s"] = tokens / seconds
        self.log_dict(stats, batch_size=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate token-weighted validation loss."""
        total, count = self.forward_loss(batch)
        self._val_sums[0] += float(total)
        self._val_sums[1] += count

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` (mean over every labelled validation token)."""
        total, count = self._val_sums
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        sums = self.all_gather(sums).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else sums
        val_loss = float(sums[0] / max(sums[1], 1.0))
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=False)
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.report.history["validation"].append((self.global_step, val_loss))
        self._val_sums = [0.0, 0]

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        """Log ``test_loss``."""
        total, count = self._val_sums
        self.log("test_loss", total / max(count, 1))
        self._val_sums = [0.0, 0]

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The optimizer plugin's optimizer and per-step scheduler."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        multipliers = lr_multipliers(self.resolved, named)
        optimizer, scheduler = self.optimizer_plugin.plugin.create(
            named, self.optimizer_plugin.cfg, int(self.trainer.estimated_stepping_batches),
            **({"lr_multipliers": multipliers} if multipliers else {}),
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        """Reject trainer settings the optimizer cannot honour, and packing with virtual tokens, before
        any weight loads."""
        if stage == "fit":
            self.check_trainer(self.trainer)
            self.check_packing(getattr(self.trainer, "datamodule", None))

    def check_packing(self, datamodule: Any) -> None:
        """Raise :class:`ConfigError` when ``datamodule`` packs rows and a delta method adds virtual tokens:
        a prefix shared by a packed row cannot follow the positions that restart per document."""
        if not getattr(datamodule, "packing", False):
            return
        for delta in self.resolved.deltas:
            if delta.optional("adds_virtual_tokens"):
                raise ConfigError(f"delta method '{delta.name}' puts virtual tokens before every sequence, which "
                                  "packed rows cannot hold per document; set data.packing: false")

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Raise :class:`ConfigError` for trainer settings an in-backward optimizer cannot honour.

        The CLI calls this before Lightning validates its own loop configuration, so the user sees
        deltatune's explanation rather than Lightning's generic manual-optimisation message.
        """
        if not self.updates_in_backward:
            return
        try:
            InBackwardOptimizer.check_trainer_compatible(
                trainer.accumulate_grad_batches, gradient_clip_val=trainer.gradient_clip_val,
                world_size=trainer.world_size, precision=trainer.precision, name=self.optimizer_plugin.name,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # -- reports ------------------------------------------------------------------------------
    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """The evaluators configured for ``split`` on its rows, as ``{"evaluator/metric": value}``."""
        datamodule = self.trainer.datamodule
        rows = datamodule.rows(split)
        metrics: dict[str, float] = {}
        with eval_mode(self.model), torch.no_grad():
            for evaluator, splits in zip(self.evaluator_plugins, self.evaluator_splits):
                if splits is not None and split not in splits:
                    continue
                result = evaluator.plugin.evaluate(self.model, datamodule.tokenizer, rows, evaluator.cfg)
                metrics.update({f"{evaluator.name}/{k}": float(v) for k, v in result.items()})
        return metrics

    def evaluate_sets(self, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """:meth:`evaluate` on every evaluation set (or on ``names``) that some evaluator covers."""
        names = self.trainer.datamodule.eval_splits() if names is None else names
        results = {name: self.evaluate(name) for name in names}
        return {name: metrics for name, metrics in results.items() if metrics}

    def sample(self) -> list[tuple[str, str, str]]:
        """``(prompt, reference, completion)`` for the first few validation rows; the prompt is the user's
        text without the chat template's framing (:func:`~deltatune.model.generation.user_text`, with
        the template variables the row was rendered with)."""
        datamodule = self.trainer.datamodule
        rows = [r for r in datamodule.rows("validation") if "prompt" in r][: self.hparams.samples]
        outputs = generate(self.model, datamodule.tokenizer, [r["prompt"] for r in rows], self.hparams.max_new_tokens)
        tokenizer = datamodule.tokenizer
        return [(user_text(tokenizer, r["prompt"], r.get("chat_template_kwargs")), r.get("response", ""), out)
                for r, out in zip(rows, outputs)]

    def _lap(self, name: str) -> None:
        """Record the seconds since the previous lap under ``timings[name]``."""
        now = time.perf_counter()
        self.report.timings[name] = round(now - self._clock.get("last", now), 1)
        self._clock["last"] = now

    def on_fit_start(self) -> None:
        """Describe the run, check packing on this model, and measure the untouched base model."""
        if not self.trainer.is_global_zero:
            return
        self._clock = {"start": time.perf_counter(), "last": time.perf_counter()}
        datamodule = self.trainer.datamodule
        trainable, total = trainable_summary(self.model)
        console.print_run_summary(self.resolved, self.optimizer_plugin, trainable, total)
        self.report.name = Path(self.trainer.default_root_dir).name
        self.report.method = console.method_text(self.resolved)
        self.report.parameters = {"trainable": trainable, "total": total}
        self.report.batches = datamodule.batch_stats()
        console.print_batches(self.report.batches)
        if datamodule.packing and (problem := packing_problem(self.model)):
            raise ConfigError(f"packing is unsafe with this model: {problem}; set data.packing: false")
        if self._resumed is not None:  # measured before training began, never on restored weights
            resume.restore_report(self._resumed, self.report)
        elif self.hparams.compare_base and self.trainer.ckpt_path is None:
            self.report.base_metrics = self.evaluate_sets()
            self.log_to_loggers(logged_metrics("base", self.report.base_metrics))
            self.report.base_samples = self.sample() if self.hparams.samples else []
        self._lap("base_eval_s")

    def log_to_loggers(self, metrics: dict[str, float]) -> None:
        """Send ``metrics`` to every configured logger (``trainer.logger``) at the current step; evaluation
        runs outside Lightning's loops, where ``self.log`` is not allowed."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def on_train_start(self) -> None:
        """On resume, restore the random state the checkpoint was written with."""
        if self._resumed is not None:
            resume.restore_rng(self._resumed)

    def on_fit_end(self) -> None:
        """Save the adapter atomically, evaluate the tuned model, write the report and the loss plot."""
        if not self.trainer.is_global_zero:
            return
        self._lap("train_s")
        root = Path(self.trainer.default_root_dir)
        out = self.adapter_path(root)
        checkpoints = resume.checkpoint_folder(self.trainer)
        save_adapter(self.model, self.resolved, out, tokenizer=self.trainer.datamodule.tokenizer,
                     overwrite=self.hparams.get("overwrite", False) or self.trainer.ckpt_path is not None,
                     protected=[root, *([checkpoints] if checkpoints else [])], hint=resume.OVERWRITE_HINT)
        self.report.adapter = str(out)
        self.report.tuned_metrics = self.evaluate_sets()
        self.log_to_loggers(logged_metrics("tuned", self.report.tuned_metrics))
        self.report.tuned_samples = self.sample() if self.hparams.samples else []
        self.report.steps = self.trainer.global_step
        self._lap("tuned_eval_s")
        self.report.timings["total_s"] = round(time.perf_counter() - self._clock["start"], 1)
        self.report.write(root / REPORT_FILE)
        plot_losses([self.report], root / PLOT_FILE)
        console.print_report(self.report)

    def on_validation_end(self) -> None:
        """``deltatune validate``: run the evaluators on the validation set and print their table."""
        if self.trainer.state.fn == "validate" and self.trainer.is_global_zero:
            metrics = self.evaluate_sets(["validation"])
            self.log_to_loggers(logged_metrics("validate", metrics))
            console.print_metrics("validation", metrics)

    def on_test_end(self) -> None:
        """``deltatune test``: run the evaluators on the test set and the extra sets; print the table."""
        if self.trainer.is_global_zero:
            names = [n for n in self.trainer.datamodule.eval_splits() if n != "validation"] or ["validation"]
            metrics = self.evaluate_sets(names)
            self.log_to_loggers(logged_metrics("test", metrics))
            console.print_metrics("test", metrics)
