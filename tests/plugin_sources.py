"""Source text of a minimal working evaluator plugin, installed as a fake distribution by the plugin-loading
and bad-input tests (``GOOD.format(name=...)``)."""

GOOD = """
from typing import ClassVar
from pydantic import BaseModel, ConfigDict
from deltatune import hookimpl

class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Echo:
    name: ClassVar[str] = "{name}"
    Config = Cfg
    def evaluate(self, model, tokenizer, rows, cfg):
        return {{"rows": float(len(rows))}}

@hookimpl
def deltatune_register_evaluators(register):
    register(Echo)
"""
