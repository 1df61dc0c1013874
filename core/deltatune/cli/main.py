"""The ``deltatune`` command (its subcommands are listed by ``deltatune --help``).

``fit``, ``validate``, ``test`` and ``predict`` are the Lightning CLI; the others are deltatune's own.
Light commands (``--version``, ``--help``, ``plugins``) are parsed before anything heavy is imported.
``--strict-plugins`` (anywhere) makes a plugin that fails to load fatal; an error is one line on stderr,
``--debug`` (anywhere) or ``DELTATUNE_DEBUG=1`` shows its traceback too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from deltatune.cli.chat import TRUST_HELP
from deltatune.errors import ConfigError, DeltaTuneError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DESCRIPTION = """\
deltatune: plugin-based delta fine-tuning of LLMs on Lightning.

  deltatune fit --config run.yaml           train (Lightning CLI: every trainer option, --ckpt_path last to resume)
  deltatune plugins show NAME               one plugin's options, with a YAML snippet for a run configuration
  deltatune export --adapter DIR --out OUT  PEFT adapter, merged model (--format merged) or GGUF file

Flags are spelt with underscores (--max_new_tokens), as Lightning's are; the hyphenated spelling
(--max-new-tokens) is accepted too. --strict-plugins makes a plugin that fails to load fatal; --debug
(or DELTATUNE_DEBUG=1) shows the traceback of an error.
"""


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
    from deltatune.ui.noise import silence_known_noise

    silence_known_noise()  # before Lightning is imported: some of it is printed at import or Trainer creation
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


def cmd_registry(args: argparse.Namespace) -> None:
    """Print registry.toml, validated."""
    from deltatune.ui.console import print_table
    from deltatune.plugin.registry import load_registry, registry_path

    registry = load_registry()
    print_table(f"registry ({registry_path()})", ["kind", "name", "distribution", "core", "summary"],
                [[e.kind, e.name, e.distribution, e.core, e.summary] for e in registry.plugin])


def cmd_export(args: argparse.Namespace) -> None:
    """Export an adapter as a merged Hugging Face model, a GGUF file or a PEFT adapter."""
    if args.format == "gguf":
        from deltatune.io.gguf import export_gguf

        print(export_gguf(Path(args.adapter), Path(args.out), type=args.gguf_type, overwrite=args.overwrite,
                          trust_remote_code=args.trust_remote_code, verify=args.verify))
    elif args.format == "merged":
        from deltatune.io.merged import export_merged

        print(export_merged(Path(args.adapter), Path(args.out), dtype=args.dtype, requantize=args.requantize,
                            trust_remote_code=args.trust_remote_code, overwrite=args.overwrite))
    else:
        from deltatune.io.peft import export_peft

        print(export_peft(Path(args.adapter), Path(args.out), trust_remote_code=args.trust_remote_code,
                          overwrite=args.overwrite))


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options ``export`` and its alias ``merge`` share."""
    parser.add_argument("--adapter", required=True, help="adapter folder written by fit")
    parser.add_argument("--out", required=True, help="folder to write (merged, peft) or .gguf file (gguf)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="dtype of the merged weights (merged format; default: fp32)")
    parser.add_argument("--requantize", action="store_true",
                        help="re-quantize merged weights (merged format; reports the error)")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_HELP)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is an earlier export (never a file or folder deltatune did not write)")
    parser.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The parser for deltatune's own subcommands (each imports what it runs only when it runs)."""
    from deltatune import __version__

    parser = argparse.ArgumentParser(prog="deltatune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}",
                        help="print the version of the deltatune core and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"Lightning CLI {name} (--config FILE.yaml; see `deltatune {name} --help`)",
                       add_help=False)

    from deltatune.cli import plugins  # `plugins`, `plugins show NAME`, `plugins docs`

    plugins.add_parser(sub)

    registry = sub.add_parser("registry", help="show registry.toml")
    registry.set_defaults(func=cmd_registry)

    from deltatune.cli import report  # `report RUN_DIR…`

    report.add_parser(sub)

    from deltatune.cli import chat  # `generate` and `chat`

    chat.add_parsers(sub)

    exp = sub.add_parser("export", help="export an adapter: PEFT adapter (default), merged model or GGUF file")
    add_export_options(exp)
    exp.add_argument("--format", choices=["peft", "merged", "gguf"], default="peft",
                     help="peft (default): a PEFT adapter folder; merged: the base with the deltas merged in; "
                     "gguf: a merged GGUF file")
    exp.add_argument("--gguf_type", "--gguf-type", default="f16", help="GGUF tensor type (gguf format): f16 (default), "
                     "bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0")
    exp.add_argument("--no_verify", "--no-verify", dest="verify", action="store_false",
                     help="gguf format: do not read the written file back with transformers to compare its logits "
                     "and token ids with the adapter model's (the read-back loads the whole model again)")
    merge = sub.add_parser("merge", help="alias of `export --format merged`")
    add_export_options(merge)
    merge.set_defaults(format="merged")

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
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
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
