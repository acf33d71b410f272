"""`domainlm run CONFIG`: run a pipeline of stages, skipping those whose outputs are up to date.

A pipeline config names stages in order; each stage is a domainlm command with its config
(a stage YAML file and/or values set inline). `${workdir}` and other `vars` are substituted.

    # domainlm run configs/demo.yaml
    workdir: runs/demo
    stages:
      corpus:
        command: corpus pydoc
        set: {output: "${workdir}/corpus"}
      tokenizer:
        command: tokenizer train
        config: configs/tokenizer/pydoc.yaml
        set: {input: ["${workdir}/corpus/corpus.jsonl"], output: "${workdir}/tokenizer"}

A stage is up to date when its output directory's manifest was written by the same command
with the same fingerprint (config and input checksums) and the same library versions; then it
is skipped. Stages with no output directory always run.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.config import leaves, load_config, read_yaml, from_dict
from domainlm.errors import UserError, did_you_mean
from domainlm.manifest import MANIFEST, fingerprint, library_versions, read_manifest
from domainlm.progress import log, summary


@dataclass(kw_only=True, slots=True)
class StageSpec:
    """One stage of a pipeline."""

    command: str
    """The domainlm command, e.g. 'tokenizer train'."""
    config: str | None = None
    """A stage YAML file (as for `domainlm COMMAND --config FILE`)."""
    set: dict[str, Any] = field(default_factory=dict)
    """Values set on top of the file, by dotted key: {train.max_steps: 10}."""


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """A pipeline: stages run in order by `domainlm run`."""

    workdir: str = "runs"
    """Where the stages write; available to values as ${workdir}."""
    vars: dict[str, str] = field(default_factory=dict)
    """More ${name} substitutions for stage values."""
    files: list[str] = field(default_factory=list)
    """The vars that name the user's input files or dirs (a corpus, QA files): each must exist
    (FILE:SPLIT and globs allowed) before any stage runs, so a mistyped path stops the run at once."""
    stages: dict[str, StageSpec] = field(default_factory=dict)
    """Stages by name, in the order they run."""


_VAR = re.compile(r"\$\{(\w+)\}")


def substitute(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in env:
                raise UserError(f"{where}: unknown variable ${{{m.group(1)}}}; defined: {', '.join(sorted(env))}")
            return env[m.group(1)]
        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [substitute(v, env, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env, where) for k, v in value.items()}
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_pipeline(path: str, extra: list[str] | None = None, variables: list[str] | None = None
                  ) -> tuple[PipelineConfig, list[tuple[str, Any, Any]]]:
    """The pipeline and, per stage, (name, command, resolved stage config)."""
    from domainlm.cli import find_command, resolve

    raw = read_yaml(path)
    for name, spec in (raw.get("stages") or {}).items() if isinstance(raw.get("stages"), dict) else ():
        if isinstance(spec, dict) and not spec.get("command"):
            raise UserError(f"{path}: stage {name!r} has no command; give the domainlm command it runs, e.g. "
                            "`command: tokenizer train`")
    pipe = from_dict(PipelineConfig, raw, source=path)
    for item in variables or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UserError(f"--var {item!r}: write NAME=VALUE, e.g. corpus=data/my/corpus.jsonl")
        if name != "workdir" and name not in pipe.vars:
            raise UserError(f"--var {item!r}: {path} has no variable {name!r}{did_you_mean(name, pipe.vars)}; "
                            f"variables: {', '.join(['workdir', *pipe.vars])}")
        if not value.strip():   # an empty path is the current directory: a workdir or corpus of the whole tree
            default = pipe.workdir if name == "workdir" else pipe.vars[name]
            raise UserError(f"--var {item!r}: the value is empty; give one (e.g. --var {name}={default}) or leave "
                            f"--var {name} out to keep {path}'s {default!r}")
        if name == "workdir":
            pipe.workdir = value
        else:
            pipe.vars[name] = value
    for name in pipe.files:
        if name not in pipe.vars:
            raise UserError(f"{path}: files: {name!r} is not one of its vars ({', '.join(pipe.vars)})")
    env = {"workdir": pipe.workdir, **pipe.vars}
    for item in extra or []:
        key, eq, value = item.partition("=")
        stage, dot, dotted = key.partition(".")
        if not eq or not dot:
            raise UserError(f"--set {item!r}: write STAGE.KEY=VALUE, e.g. tokenizer.vocab_size=8000")
        if stage not in pipe.stages:
            raise UserError(f"--set {item!r}: no stage {stage!r}{did_you_mean(stage, pipe.stages)}; "
                            f"stages: {', '.join(pipe.stages)}")
        pipe.stages[stage].set[dotted] = value
    resolved = []
    for name, spec in pipe.stages.items():
        where = f"{path}: stage {name!r}"
        try:
            cmd = find_command(spec.command)
        except KeyError:
            from domainlm.cli import COMMANDS

            names = [c.name for c in COMMANDS if c.config]
            raise UserError(f"{where}: unknown command {spec.command!r}{did_you_mean(spec.command, names)}; "
                            f"commands: {', '.join(names)}") from None
        if not cmd.config:
            raise UserError(f"{where}: {spec.command!r} cannot run as a pipeline stage")
        cls = resolve(cmd.config)
        overrides = flatten(substitute(spec.set, env, where))
        cfg_path = substitute(spec.config, env, where) if spec.config else None
        try:
            cfg = load_config(cls, cfg_path, overrides)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        resolved.append((name, cmd, cfg))
    writers: dict[Path, str] = {}
    for name, cmd, cfg in resolved:
        out = output_dir(cfg)
        if out is None:
            continue
        other = writers.setdefault(out.resolve(), name)
        if other != name:
            raise UserError(f"{path}: stages {other!r} and {name!r} both write {str(out)!r}; each would replace the "
                            "other's output on every run: give one of them another output")
    return pipe, resolved


def output_dir(cfg: Any) -> Path | None:
    for leaf in leaves(type(cfg)):
        if leaf.role == "output":
            value = cfg
            for part in leaf.path.split("."):
                value = getattr(value, part)
            return Path(value) if value else None
    return None


def stage_state(cmd, cfg) -> str:
    """'up to date', or why the stage must run."""
    from domainlm.cli import resolve

    out = output_dir(cfg)
    if out is None or cmd.inputs is None:
        return "always runs"
    if not (out / MANIFEST).is_file():
        return "no output yet"
    try:
        m = read_manifest(out)
    except UserError:
        return "unreadable manifest"
    if m.get("stage") != cmd.name:
        return f"output made by {m.get('stage')!r}"
    if m.get("versions") != library_versions():
        return "library versions changed"
    try:
        inputs = resolve(cmd.inputs)(cfg)
    except UserError:
        return "inputs not ready"
    if m.get("fingerprint") != fingerprint(cmd.name, cfg, inputs):
        return "config or inputs changed"
    return "up to date"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", metavar="CONFIG", help="pipeline YAML, e.g. configs/demo.yaml")
    parser.add_argument("--only", nargs="+", metavar="STAGE", default=None, help="run just these stages")
    parser.add_argument("--force", nargs="*", metavar="STAGE", default=None,
                        help="rerun these stages even if up to date (all stages when none named)")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a stage value, e.g. --set tokenizer.vocab_size=8000 (repeatable)")
    parser.add_argument("--var", dest="var_values", action="append", default=[], metavar="NAME=VALUE",
                        help="set a pipeline variable (workdir or one under vars:), e.g. --var corpus=my.jsonl")
    parser.add_argument("--dry-run", action="store_true", help="show what would run and why, run nothing")


def run_command(ns: argparse.Namespace) -> int:
    """Run every stage of a pipeline config in order, skipping those that are up to date."""
    run_pipeline(ns.pipeline, set_values=ns.set_values, var_values=ns.var_values, only=ns.only, force=ns.force,
                 dry_run=ns.dry_run)
    return 0


def _check_file_var(name: str, value: str, path: str) -> None:
    import glob

    from domainlm.qa import split_spec

    target = split_spec(value)[0] if not Path(value).exists() else value
    if not Path(target).exists() and not glob.glob(target):
        raise UserError(f"--var {name}={value}: no such file or directory; give the path of your {name} "
                        f"(the defaults in {path} are placeholders), e.g. --var {name}=data/law/{Path(value).name}")


def run_pipeline(path: str, *, set_values: list[str] = (), var_values: list[str] = (), only: list[str] | None = None,
                 force: list[str] | None = None, dry_run: bool = False, skip_commands: tuple[str, ...] = ()) -> None:
    """`domainlm run PATH`; stages whose command is in `skip_commands` are left out (`compare`
    runs a pipeline's earlier stages this way, never itself)."""
    from domainlm.cli import resolve

    pipe, stages = load_pipeline(path, list(set_values), list(var_values))
    for name in pipe.files:
        _check_file_var(name, pipe.vars[name], path)
    stages = [s for s in stages if s[1].name not in skip_commands]
    names = [n for n, _, _ in stages]
    for n in (only or []) + (force or []):
        if n not in names:
            raise UserError(f"no stage {n!r} in {path}{did_you_mean(n, names)}; stages: {', '.join(names)}")
    left_out = [n for n in force or [] if only and n not in only]
    if left_out:
        raise UserError(f"--force {' '.join(left_out)}: not among --only {' '.join(only)}, so it would not run; add it "
                        "to --only or drop it from --force")
    rows = []
    t_all = time.perf_counter()
    for name, cmd, cfg in stages:
        if only and name not in only:
            continue
        forced = force is not None and (not force or name in force)
        state = stage_state(cmd, cfg)
        if state == "up to date" and not forced:
            log.info("stage %s (%s): up to date, skipped", name, cmd.name)
            rows.append((name, f"skipped, up to date ({cmd.name})"))
            continue
        why = "forced" if forced else state
        if dry_run:
            rows.append((name, f"would run: {why} ({cmd.name})"))
            continue
        log.info("stage %s: domainlm %s (%s)", name, cmd.name, why)
        t0 = time.perf_counter()
        try:
            resolve(cmd.run)(cfg)
        except UserError as e:
            raise UserError(f"stage {name!r} ({cmd.name}): {e}") from None
        rows.append((name, f"ran in {time.perf_counter() - t0:.1f}s ({cmd.name}; {why})"))
        after = stage_state(cmd, cfg)
        if after not in ("up to date", "always runs"):
            # e.g. pretraining stopped by SIGTERM after saving a checkpoint: later stages would read a
            # half-trained model, so the pipeline stops here and the same command resumes it.
            rows.append(("total", f"{time.perf_counter() - t_all:.1f}s"))
            summary(f"domainlm run {path}", rows)
            raise UserError(f"stage {name!r} ({cmd.name}) stopped before it finished ({after}); rerun "
                            f"`domainlm run {path}` to resume it")
    rows.append(("total", f"{time.perf_counter() - t_all:.1f}s"))
    summary(f"domainlm run {path}", rows)
