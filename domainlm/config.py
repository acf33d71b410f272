"""Typed stage configs: dataclasses loaded from YAML and overridden from the command line.

Each stage has one config class made of small sub-dataclasses, declared with
``@dataclass(kw_only=True, slots=True)`` and a docstring under every field (LitGPT's style)::

    @dataclass(kw_only=True, slots=True)
    class TrainArgs:
        max_steps: int = 100
        \"\"\"Optimizer steps to run.\"\"\"

Values are resolved in this order: the dataclass defaults, then the YAML file given with
``--config``, then command-line flags (``--train.max_steps=10`` or ``--train.max-steps 10``).
A wrong key names the key and lists the valid ones; a wrong type names the key and the type.

Why our own ~300 lines and not jsonargparse/tyro/hydra: the error messages are part of the
product (each names the file, the key and the fix), ``--help`` must show every field's docstring
and default, and the same loader serves YAML files, CLI flags and the pipeline runner, with no
dependency that brings its own config semantics.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from domainlm.errors import UserError, did_you_mean

# Field metadata: `role` marks the fields the pipeline runner fingerprints (inputs) and the
# directory a stage writes (output), so `domainlm run` can tell when a stage is up to date.
INPUT = {"role": "input"}
OUTPUT = {"role": "output"}
# How a stage runs, not what it makes (worker counts, --overwrite): kept out of manifests and
# fingerprints, so the same inputs and config give the same bytes whatever the machine.
RUNTIME = {"role": "runtime"}


# ---------------------------------------------------------------------------------------------
# Field docstrings: Python drops the string under an annotated assignment, so read the source.


def check_adamw(optim: Any) -> None:
    """The AdamW values pretraining and fine-tuning share (beta1, beta2, eps, weight_decay,
    clip_grad), each refused with its value where torch would raise a traceback or take it
    silently."""
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(optim, name) < 1.0:
            raise UserError(f"optim.{name} must be in [0, 1), got {getattr(optim, name)}")
    if not optim.eps > 0:
        raise UserError(f"optim.eps must be > 0, got {optim.eps}")
    if not optim.weight_decay >= 0:
        raise UserError(f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    if not optim.clip_grad >= 0:
        raise UserError(f"optim.clip_grad must be >= 0 (0 turns clipping off), got {optim.clip_grad}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def type_name(tp: Any) -> str:
    """A readable name for a type annotation, as shown in errors and --help."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin is dict:
        k, v = get_args(tp)
        return f"dict[{type_name(k)}, {type_name(v)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------
# Values: check and convert one value against its annotation.

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str, *, from_string: bool = False) -> Any:
    """Return `value` as type `tp`, or raise UserError naming `key`.

    `from_string` is set for command-line values, which arrive as text and may be converted
    ("10" -> 10, "false" -> False, "none" -> None); YAML values already carry their type.
    """

    def bad(extra: str = "") -> UserError:
        return UserError(f"config key {key!r}: expected {type_name(tp)}, got {value!r}{extra}")

    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = get_args(tp)
        if type(None) in options and (
            value is None or (from_string and str(value).lower() in ("none", "null"))
        ):
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return coerce(value, opt, key, from_string=from_string)
            except UserError:
                pass
        raise bad()
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise UserError(
            f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}"
        )
    if origin in (list, tuple):
        (item_tp,) = get_args(tp)[:1]
        if from_string and isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.startswith("[") else [value]
            except yaml.YAMLError as e:
                raise bad(f" (not a YAML list: {e.__class__.__name__}; e.g. [a, b])") from None
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [coerce(v, item_tp, f"{key}[{i}]", from_string=from_string) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        if from_string and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise bad(f" ({e.__class__.__name__})") from None
        if not isinstance(value, dict):
            raise bad()
        return {
            coerce(k, k_tp, key): coerce(v, v_tp, f"{key}.{k}", from_string=from_string)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_string:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad()
        return from_dict(tp, value, prefix=f"{key}.")
    raise bad()


# ---------------------------------------------------------------------------------------------
# Whole configs.


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", source: str = "") -> Any:
    """Build config `cls` from a nested dict; unknown keys and wrong types raise UserError."""
    if not isinstance(data, dict):
        raise UserError(f"{source or 'config'}: {prefix or 'top level'} must be a mapping")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = f" in {source}" if source else ""
    for k in data:
        if k not in names:
            raise UserError(
                f"unknown config key {prefix + str(k)!r}{where}{did_you_mean(str(k), names)}; "
                f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name in data:
            tp = hints[f.name]
            if _is_config(tp) and isinstance(data[f.name], dict):
                kwargs[f.name] = from_dict(tp, data[f.name], prefix=key + ".", source=source)
            else:
                kwargs[f.name] = coerce(data[f.name], tp, key)
        elif _default_of(f) is dataclasses.MISSING:
            raise UserError(
                f"missing required config key {key!r}{where}: set it in the YAML file or with "
                f"--{key.replace('_', '-')}"
            )
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (what manifests and --print-config show)."""
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing file or a syntax error."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {str(p)!r} is a directory; give a YAML file")
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {str(p)!r}{at}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {str(p)!r}: the top level must be a mapping of keys")
    return data


def deep_update(base: dict, extra: dict) -> dict:
    """Merge `extra` into a copy of `base`, recursing into nested mappings."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted == 'a.b', creating levels as needed."""
    *head, last = dotted.split(".")
    for part in head:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise UserError(f"config key {dotted!r}: {part!r} is not a section")
    data[last] = value


def load_config(
    cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Any:
    """Defaults, then the YAML file, then `overrides` ({'train.max_steps': '10'} from the CLI)."""
    data = read_yaml(path) if path else {}
    if overrides:
        flat = {}
        for dotted, value in overrides.items():
            tp = leaf_type(cls, dotted)
            set_dotted(flat, dotted, coerce(value, tp, dotted, from_string=True))
        data = deep_update(data, flat)
    cfg = from_dict(cls, data, source=str(path) if path else "")
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def leaf_type(cls: type, dotted: str) -> Any:
    """The annotation of the leaf field at `dotted`; UserError for a path that is not one."""
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        if not _is_config(tp):
            raise UserError(f"config key {'.'.join(walked)!r} has no sub-keys (asked for {dotted!r})")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            prefix = ".".join(walked)
            raise UserError(
                f"unknown config key {dotted!r}{did_you_mean(part, names)}; valid keys"
                f"{' under ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        tp = _hints(tp)[part]
        walked.append(part)
    return tp


@dataclasses.dataclass(slots=True)
class Leaf:
    """One settable field of a config, as the CLI exposes it."""

    path: str
    type: Any
    default: Any
    doc: str
    role: str | None
    section: str


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every leaf field of config `cls` with its dotted path, depth first in declaration order."""
    out: list[Leaf] = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = prefix + f.name
        if _is_config(tp):
            out.extend(leaves(tp, path + "."))
        else:
            out.append(
                Leaf(path, tp, _default_of(f), docs.get(f.name, ""), f.metadata.get("role"),
                     prefix.rstrip("."))
            )
    return out


def section_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted section name -> the docstring of its sub-dataclass field (for --help groups)."""
    out = {}
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_config(tp):
            out[prefix + f.name] = docs.get(f.name) or (tp.__doc__ or "").strip().split("\n")[0]
            out.update(section_docs(tp, prefix + f.name + "."))
    return out


# ---------------------------------------------------------------------------------------------
# argparse: one flag per leaf field, generated from the config class.


def _fmt_default(v: Any) -> str:
    if v is dataclasses.MISSING:
        return "required"
    if isinstance(v, str):
        return repr(v) if v else "''"
    if isinstance(v, (list, dict)) and not v:
        return "empty"
    return str(v)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add --config, --print-config and one flag per config field to `parser`."""
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML file with values for the fields below; flags given here override it",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config as YAML and exit without running",
    )
    groups = {"": parser.add_argument_group("config")}
    for name, doc in section_docs(cls).items():
        groups[name] = parser.add_argument_group(f"{name}", doc)
    for leaf in leaves(cls):
        # One spelling in --help (dashes); normalize_argv maps --a_b to --a-b before parsing.
        flag = f"--{leaf.path.replace('_', '-')}"
        base = leaf.type
        args = get_args(base)
        if get_origin(base) in (types.UnionType, typing.Union) and type(None) in args:
            base = next(a for a in args if a is not type(None))
        kw: dict[str, Any] = dict(dest=leaf.path, default=argparse.SUPPRESS)
        help_text = leaf.doc.replace("%", "%%") if leaf.doc else ""
        kw["help"] = f"{help_text} [default: {_fmt_default(leaf.default)}]".strip()
        group = groups[leaf.section]
        if base is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
            group.add_argument(flag, **kw)
            group.add_argument(
                f"--no-{flag[2:]}", dest=leaf.path, action="store_const",
                const="false", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
            )
            continue
        if get_origin(base) in (list, tuple):
            kw.update(nargs="+", metavar=_METAVARS.get(get_args(base)[0], "VALUE"))
        elif get_origin(base) is Literal:
            kw.update(metavar="{" + ",".join(map(str, get_args(base))) + "}")
        else:
            kw.update(metavar=_METAVARS.get(base, "VALUE"))
        group.add_argument(flag, **kw)


_METAVARS = {str: "TEXT", int: "N", float: "X", bool: "BOOL"}


def normalize_argv(argv: list[str]) -> list[str]:
    """--train.max_steps=10 -> --train.max-steps=10: both spellings work, help shows one."""
    out = []
    for a in argv:
        if a == "--":
            out.extend(argv[len(out):])
            break
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Resolve config `cls` from parsed arguments (defaults < --config YAML < flags)."""
    overrides = {
        leaf.path: getattr(ns, leaf.path) for leaf in leaves(cls) if hasattr(ns, leaf.path)
    }
    return load_config(cls, getattr(ns, "config", None), overrides)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML text (for --print-config and run records)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
