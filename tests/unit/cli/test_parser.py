"""The ``deltatune`` command line: help on every flag, one spelling convention, ``merge`` as an alias only."""

from __future__ import annotations

import argparse

import pytest

from deltatune.cli.main import build_parser


def parsers(parser: argparse.ArgumentParser, path: str = "deltatune") -> list[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser below it, with its command path."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += parsers(child, f"{path} {name}")
    return found


OWN = [(path, p) for path, p in parsers(build_parser()) if p.add_help]  # the Lightning commands have their own


def test_every_flag_and_argument_has_help():
    missing = [f"{path} {action.option_strings or action.dest}" for path, parser in OWN for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_flags_are_spelt_with_underscores_and_accept_hyphens():
    wrong = []
    for path, parser in OWN:
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and "-" in longs[0][2:]:
                wrong.append(f"{path} {longs[0]}: the first spelling must use underscores")
            if longs and "_" in longs[0] and longs[0].replace("_", "-") not in longs:
                wrong.append(f"{path} {longs[0]}: the hyphenated alias is missing")
    assert wrong == []


def test_hyphenated_spellings_are_aliases():
    parser = build_parser()
    underscores = parser.parse_args(["generate", "--prompt", "hi", "--max_new_tokens", "3", "--trust_remote_code"])
    hyphens = parser.parse_args(["generate", "--prompt", "hi", "--max-new-tokens", "3", "--trust-remote-code"])
    assert vars(underscores) == vars(hyphens) and underscores.max_new_tokens == 3
    estimate = parser.parse_args(["estimate", "--base", "tiny-llama", "--base-dtype", "bf16", "--gradient-checkpointing"])
    assert estimate.base_dtype == "bf16" and estimate.gradient_checkpointing


def test_merge_is_export_of_a_merged_model_only(capsys):
    parser = build_parser()
    merge = parser.parse_args(["merge", "--adapter", "a", "--out", "o"])
    export = parser.parse_args(["export", "--adapter", "a", "--out", "o", "--format", "merged"])
    assert merge.format == "merged" and merge.func is export.func
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", "--adapter", "a", "--out", "o", "--format", "peft"])
    assert "unrecognized arguments: --format peft" in capsys.readouterr().err
