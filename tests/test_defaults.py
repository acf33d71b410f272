"""Nothing of the demo's domain hides in a default: a command's defaults (check prompts, smoke
questions, merge prompts, ...) must serve a law or medicine corpus as well as the pydoc one, which
the demo names explicitly in configs/demo.yaml. `corpus pydoc` is the pydoc builder itself."""

from __future__ import annotations

import dataclasses
import importlib
import re

from domainlm.cli import COMMANDS

# Words of the pydoc demo domain (its modules, its corpus's name).
PYDOC = re.compile(r"pydoc|json\.dumps|os\.path|numpy|\bnp\.|collections|asyncio", re.I)


def _defaults(cls):
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            yield f.name, f.default
        elif f.default_factory is not dataclasses.MISSING:
            yield f.name, f.default_factory()


def _strings(value, where):
    if dataclasses.is_dataclass(value):
        for name, v in _defaults(type(value)):
            yield from _strings(v, f"{where}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}[{k!r}]")
    elif isinstance(value, str):
        yield where, value


def test_no_default_names_the_demo_domain():
    found, seen = [], 0
    for cmd in COMMANDS:
        if not cmd.config or cmd.name == "corpus pydoc":
            continue
        module, name = cmd.config.split(":")
        cls = getattr(importlib.import_module(module), name)
        for field, value in _defaults(cls):
            for where, text in _strings(value, f"{cmd.name}: {field}"):
                seen += 1
                if PYDOC.search(text):
                    found.append(f"{where} = {text!r}")
    assert seen > 100                          # the walk reaches the nested settings' strings
    assert not found, "\n".join(found)
