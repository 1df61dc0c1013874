"""The ``deltatune`` command.

``fit``, ``validate``, ``test`` and ``predict`` are the Lightning CLI (``--config FILE.yaml``, every
trainer option, ``--ckpt_path last`` to resume). The other subcommands are deltatune's own:
``plugins``, ``registry``, ``report`` (print, plot and compare finished runs), ``generate``, ``export``,
``merge``, ``estimate`` (memory planning) and ``new-plugin`` (scaffold a plugin package).
``--strict-plugins`` (anywhere) makes a plugin that fails to load fatal. An error is one line on
stderr; ``--debug`` (anywhere) or ``DELTATUNE_DEBUG=1`` shows its traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError, DeltaTuneError, check_option

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TRUST_HELP = "allow the base model's own Python code (needed for an adapter trained with trust_remote_code)"


def check_strategy(trainer: Any) -> None:
    """Refuse FSDP where Lightning cannot run it (no CUDA), with what to use instead, before anything loads."""
    strategy, accelerator = trainer.get("strategy"), str(trainer.get("accelerator") or "auto")
    name = str(strategy.get("class_path", "") if hasattr(strategy, "get") else strategy).lower()
    if "fsdp" not in name:
        return
    import torch

    if accelerator not in ("cuda", "gpu", "auto") or not torch.cuda.is_available():
        raise ConfigError(
            f"strategy '{name}' (FSDP) needs CUDA GPUs: Lightning's FSDPStrategy refuses accelerator "
            f"'{accelerator}'{'' if torch.cuda.is_available() else ' and no GPU is visible'}. On CPUs use "
            "`trainer.strategy: ddp` (one process per device, gloo); for FSDP on GPUs see docs/scale-out.md"
        )


OPTIMIZER_HINT = ("is Lightning's own optimizer option, which deltatune does not use: the optimizer and its "
                  "learning-rate schedule are the optimizer plugin's, set with model.optimizer ("
                  "--model.optimizer='{name: NAME, config: {lr: ...}}'; `deltatune plugins` lists the optimizers)")
LIGHTNING_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")
REFUSED_OPTIONS = {
    **dict.fromkeys(LIGHTNING_OPTIMIZER_KEYS, OPTIMIZER_HINT),
    "trainer.logger.save_dir": "is set by deltatune: a logger writes under the run folder, "
                               "trainer.default_root_dir; set that instead",
}
"""Options the Lightning CLI would take that deltatune sets itself: option (or its first part) -> why."""


def refused_option(key: str) -> str | None:
    """The entry of :data:`REFUSED_OPTIONS` that the dotted option ``key`` sets (``init_args`` left out)."""
    key = key.replace(".init_args.", ".")
    return next((option for option in REFUSED_OPTIONS if key == option or key.startswith(option + ".")), None)


def config_keys(data: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a parsed YAML config that holds a value (lists of loggers included; a key set to
    null, as in the ``config.yaml`` an earlier deltatune saved, sets nothing)."""
    if isinstance(data, list):
        return [key for item in data for key in config_keys(item, prefix)]
    if not isinstance(data, dict):
        return []
    return [key for name, value in data.items() if value is not None
            for key in [f"{prefix}{name}", *config_keys(value, f"{prefix}{name}.")]]


def check_refused_options(argv: list[str]) -> None:
    """Refuse, on the command line or in a ``--config`` file, an option of :data:`REFUSED_OPTIONS`, with
    what to set instead (before anything loads)."""
    import yaml

    found = [(arg[2:].split("=")[0], "the command line") for arg in argv if arg.startswith("--")]
    configs = [value.split("=", 1)[1] if value.startswith("--config=") else argv[i + 1]
               for i, value in enumerate(argv) if value.startswith("--config=")
               or (value == "--config" and i + 1 < len(argv))]
    for config in configs:
        path = Path(config)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        found += [(key, str(path)) for key in config_keys(data)]
    for key, where in found:
        option = refused_option(key)
        if option is not None:
            raise ConfigError(f"{option} (in {where}) {REFUSED_OPTIONS[option]}")


def run_lightning(argv: list[str]) -> None:
    """Run a Lightning CLI subcommand with deltatune's module, data module and defaults."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
    from lightning.pytorch.cli import LightningCLI

    from deltatune.plugin.manager import get_plugin_manager
    from deltatune.ui.console import print_warning

    from deltatune.train.checkpoint import AtomicModelCheckpoint
    from deltatune.data.module import InstructionDataModule
    from deltatune.train.module import DeltaTuneModule
    from deltatune.train.resume import check_before_fit
    from deltatune.ui.progress import RunProgressBar

    class DeltaTuneCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("model.base", "data.base")
            parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
            # a logger (--trainer.logger=CSVLogger, TensorBoardLogger, …) writes under the run folder
            parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")
            for key in LIGHTNING_OPTIMIZER_KEYS:  # null in the config.yaml an earlier deltatune saved; set: refused
                parser.add_argument(f"--{key}", type=dict | None, default=None, help=argparse.SUPPRESS)
            parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                                 "checkpoint.every_n_train_steps": 50})

        def before_instantiate_classes(self) -> None:
            check_strategy(self.config[self.subcommand]["trainer"])

        def before_fit(self) -> None:
            self.model.check_trainer(self.trainer)
            check_before_fit(self.trainer, self.model, self.config[self.subcommand].get("ckpt_path"))

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
            # Lightning refuses its own switches when a callback of that kind is present: honour them
            # (this LightningCLI method is where the CLI's extra and default callbacks are added)
            if config.get("enable_checkpointing") is False:
                callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
                if self.subcommand == "fit":
                    print_warning("trainer.enable_checkpointing is false: no checkpoint is written, so this run "
                                  "cannot be resumed with --ckpt_path")
            if config.get("enable_progress_bar") is False:
                self.trainer_defaults = {**self.trainer_defaults, "callbacks": [
                    c for c in self.trainer_defaults.get("callbacks", []) if not isinstance(c, ProgressBar)]}
            return super()._instantiate_trainer(config, callbacks)

    failures = get_plugin_manager().failures
    if failures:
        print_warning(f"{len(failures)} plugin(s) failed to load and are skipped: "
                      + "; ".join(f"{f.distribution} {f.version} ({f.error})" for f in failures)
                      + " (see `deltatune plugins`)")
    check_refused_options(argv)
    sys.argv = [sys.argv[0], *argv]  # LightningCLI reads sys.argv (and warns when given both)
    DeltaTuneCLI(
        DeltaTuneModule,
        InstructionDataModule,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the optimizer plugin (model.optimizer) is the only optimizer
        trainer_defaults={
            "default_root_dir": "runs/default",
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "callbacks": [RunProgressBar(leave=True)],
        },
    )


def cmd_plugins(args: argparse.Namespace) -> None:
    """List installed plugins, failures and registry entries not installed."""
    from deltatune import __version__
    from deltatune.ui.console import console, print_table
    from deltatune.plugin.manager import load_plugins
    from deltatune.plugin.protocols import PLUGIN_KINDS
    from deltatune.plugin.registry import load_registry

    manager = load_plugins()
    registry = load_registry()
    installed = {(i.kind, i.name) for i in manager.all()}
    missing = [e for e in registry.plugin if (e.kind, e.name) not in installed]
    if args.json:
        print(json.dumps({
            "core_version": __version__,
            "installed": [{"kind": i.kind, "name": i.name, "distribution": i.distribution,
                           "version": i.version, "source": i.source} for i in manager.all()],
            "failed": [vars(f) for f in manager.failures],
            "conflicts": [{"kind": kind, "name": name, "distributions": [i.distribution for i in infos]}
                          for (kind, name), infos in manager.conflicts.items()],
            "not_installed": [{"kind": e.kind, "name": e.name, "distribution": e.distribution,
                               "install": e.install_command()} for e in missing],
        }, indent=2))
        return
    print_table("installed plugins", ["kind", "name", "distribution", "version", "source"],
                [[PLUGIN_KINDS[i.kind].label, i.name, i.distribution, i.version, i.source] for i in manager.all()])
    if manager.failures:
        print_table("plugins that failed to load (skipped)", ["distribution", "version", "source", "error"],
                    [[f.distribution, f.version, f.source, f.error] for f in manager.failures])
    if manager.conflicts:
        print_table("name conflicts (unusable until one is uninstalled or denied with DELTATUNE_DISABLE_PLUGINS)",
                    ["kind", "name", "registered by"],
                    [[PLUGIN_KINDS[kind].label, name, ", ".join(f"{i.distribution} {i.version}" for i in infos)]
                     for (kind, name), infos in manager.conflicts.items()])
    if missing:
        print_table("in registry.toml, not installed", ["kind", "name", "distribution", "install with"],
                    [[PLUGIN_KINDS[e.kind].label, e.name, e.distribution, e.install_command()] for e in missing])
    console.print(f"deltatune core {__version__}")


def cmd_registry(args: argparse.Namespace) -> None:
    """Print registry.toml, validated."""
    from deltatune.ui.console import print_table
    from deltatune.plugin.registry import load_registry, registry_path

    registry = load_registry()
    print_table(f"registry ({registry_path()})", ["kind", "name", "distribution", "core", "summary"],
                [[e.kind, e.name, e.distribution, e.core, e.summary] for e in registry.plugin])


def cmd_generate(args: argparse.Namespace) -> None:
    """Load base + adapter and print completions of the prompts."""
    from deltatune.io.adapter import load_adapter
    from deltatune.model.generation import chat_prompt, generate
    from deltatune.model.loading import load_base, load_tokenizer

    check_option("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be at least 1")
    for number, prompt in enumerate(args.prompt, start=1):
        check_option(f"--prompt #{number}", prompt, bool(prompt), "is empty: there is nothing to continue")
    if args.adapter:
        model, resolved = load_adapter(Path(args.adapter), base=args.base, trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(resolved.spec.base, args.trust_remote_code)
    else:
        model, tokenizer = load_base(args.base or "smollm2-135m-instruct", trust_remote_code=args.trust_remote_code)
    prompts = [p if args.raw else chat_prompt(tokenizer, p) for p in args.prompt]
    for completion in generate(model, tokenizer, prompts, args.max_new_tokens):
        print(completion)


def cmd_export(args: argparse.Namespace) -> None:
    """Export an adapter as a merged Hugging Face model, a GGUF file or a PEFT adapter."""
    if args.format == "gguf":
        from deltatune.io.gguf import export_gguf

        print(export_gguf(Path(args.adapter), Path(args.out), type=args.gguf_type, overwrite=args.overwrite,
                          trust_remote_code=args.trust_remote_code))
    elif args.format == "merged":
        from deltatune.io.merged import export_merged

        print(export_merged(Path(args.adapter), Path(args.out), dtype=args.dtype, requantize=args.requantize,
                            trust_remote_code=args.trust_remote_code, overwrite=args.overwrite))
    else:
        from deltatune.io.peft import export_peft

        print(export_peft(Path(args.adapter), Path(args.out), trust_remote_code=args.trust_remote_code,
                          overwrite=args.overwrite))


def build_parser() -> argparse.ArgumentParser:
    """The parser for deltatune's own subcommands."""
    parser = argparse.ArgumentParser(prog="deltatune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"Lightning CLI {name} (--config FILE.yaml; see `deltatune {name} --help`)",
                       add_help=False)

    plugins = sub.add_parser("plugins", help="list installed plugins and registry entries not installed")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    registry = sub.add_parser("registry", help="show registry.toml")
    registry.set_defaults(func=cmd_registry)

    from deltatune.cli import report  # `report RUN_DIR…`

    report.add_parser(sub)

    gen = sub.add_parser("generate", help="generate with a base model and an adapter")
    gen.add_argument("--adapter", help="adapter folder written by fit")
    gen.add_argument("--base", help="override the adapter's base model")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    gen.set_defaults(func=cmd_generate)

    for name in ("export", "merge"):
        exp = sub.add_parser(name, help="export an adapter (merged model, GGUF file or PEFT adapter)")
        exp.add_argument("--adapter", required=True)
        exp.add_argument("--out", required=True, help="folder to write (merged, peft) or .gguf file (gguf)")
        exp.add_argument("--format", choices=["merged", "gguf", "peft"], default="merged" if name == "merge" else "peft")
        exp.add_argument("--gguf-type", default="f16", help="GGUF tensor type (gguf format): f16 (default), bf16, f32, q8_0, "
                         "q5_1, q5_0, q4_1 or q4_0")
        exp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
        exp.add_argument("--requantize", action="store_true", help="re-quantize merged weights (reports the error)")
        exp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
        exp.add_argument("--overwrite", action="store_true",
                         help="replace OUT if it is an earlier export (never a file or folder deltatune did not write)")
        exp.set_defaults(func=cmd_export)

    from deltatune.cli import estimate, scaffold  # their subcommands: `estimate`, `new-plugin`

    estimate.add_parser(sub)
    scaffold.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltatune`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--strict-plugins" in argv:
        argv.remove("--strict-plugins")
        os.environ["DELTATUNE_STRICT_PLUGINS"] = "1"
    debug = os.environ.get("DELTATUNE_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_lightning(argv)
            return 0
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return 2
        args.func(args)
        return 0
    except Exception as exc:  # KeyboardInterrupt and SystemExit pass through
        from deltatune.ui.console import print_error

        if debug:
            traceback.print_exc()
        if isinstance(exc, DeltaTuneError):
            print_error(str(exc))
        else:  # not an error deltatune raises on purpose: one line, the traceback on request
            first = (str(exc).strip().splitlines() or [""])[0]
            print_error(f"{type(exc).__name__}: {first}" + ("" if debug else
                        " (unexpected; rerun with --debug or DELTATUNE_DEBUG=1 for the traceback)"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
