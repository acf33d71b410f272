"""Stage outputs and their manifests (ARCHITECTURE.md, "Contracts").

Every stage writes a directory with a `manifest.json` saying what made it: the stage, the
resolved config, the inputs with their checksums, the library versions and the counts. The next
stage reads it to check what it is given; `domainlm run` compares fingerprints to skip stages
whose outputs are up to date.

A stage writes into a hidden sibling directory and renames it into place once the manifest is
written, so an interrupted or failed run never leaves a half-written output behind, and an
output directory that holds something other than this stage's earlier output is refused unless
the user passes --overwrite.
"""

from __future__ import annotations

import functools
import glob as globlib
import hashlib
import json
import os
import shutil
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from domainlm import __version__
from domainlm.config import leaves, to_dict
from domainlm.errors import UserError
from domainlm.progress import human_bytes, log

MANIFEST = "manifest.json"

# The libraries whose versions decide what a stage produces; recorded in every manifest.
TRACKED_LIBRARIES = (
    "torch", "megatron-core", "sentencepiece", "tokenizers", "transformers", "apache-beam",
    "webdataset", "datasets", "peft", "triton", "numpy", "pyarrow",
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """The versions every manifest records (a copy: read once per process, since
    importlib.metadata walks every installed distribution)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "domainlm": __version__}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def expand_inputs(patterns: list[str], suffixes: tuple[str, ...] | None = None, kind: str = "corpus files") -> list[Path]:
    """Files named by paths, globs and directories (searched recursively), sorted, unique.

    A directory that holds a manifest or a saved `datasets` dir is kept whole (the caller reads
    it as one input). Names nothing -> UserError naming the pattern.
    """
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(globlib.glob(os.path.expanduser(pat), recursive=True)) if globlib.has_magic(pat) else [pat]
        found = False
        for hit in hits:
            p = Path(hit)
            if p.is_dir():
                if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
                    out.append(p)
                    found = True
                    continue
                skipped = []
                for f in sorted(p.rglob("*")):
                    if not f.is_file() or hidden_below(str(f), str(p)):
                        continue
                    if suffixes is None or f.name.lower().endswith(suffixes):
                        out.append(f)
                        found = True
                    else:
                        skipped.append(str(f))
                left_out(pat, skipped, kind, suffixes)
            elif p.is_file():
                out.append(p)
                found = True
        if not found:
            what = "matches no file" if globlib.has_magic(pat) else "does not exist"
            if Path(pat).is_dir():
                what = f"is a directory with no {'/'.join(suffixes) if suffixes else ''} files"
            raise UserError(f"input {pat!r} {what}; give a file, a glob or a directory of {kind}")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def hidden_below(path: str, directory: str) -> bool:
    """Whether `path`, a file found under `directory`, has a hidden part below it (.git/...,
    .cache/..., .DS_Store): such files are never inputs."""
    top = directory.rstrip("/")
    if "://" in path:
        rel = path[len(top) + 1:] if path.startswith(top + "/") else os.path.basename(path)
    else:
        rel = os.path.relpath(path, top or "/")
    return any(part.startswith(".") and part not in (".", "..") for part in rel.replace("\\", "/").split("/"))


_WARNED: set[tuple[str, tuple[str, ...]]] = set()
"""What `left_out` said in this command (a stage lists its inputs more than once; `domainlm run`
says it once for the pipeline); `domainlm.cli.main` clears it."""


def forget_left_out() -> None:
    """A new command: `left_out` warns again."""
    _WARNED.clear()


def left_out(directory: str, paths: list[str], kind: str, suffixes: tuple[str, ...] | None) -> None:
    """Warn, once for a directory input, about the files in it whose names are not `suffixes`
    (not read): how many, by ending, the first of them, and the fix. Nothing for none."""
    if not paths or suffixes is None:
        return
    from collections import Counter

    from domainlm.progress import log

    def ending(p: str) -> str:
        name = os.path.basename(p).lower()
        parts = name.split(".")
        return "." + ".".join(parts[-2:]) if len(parts) > 2 and parts[-1] in ("gz", "bz2", "xz", "zst") else (
            "." + parts[-1] if len(parts) > 1 else "no ending")

    key = (directory, tuple(paths))
    if key in _WARNED:                       # a stage that lists its inputs twice warns once
        return
    _WARNED.add(key)
    by = sorted(Counter(ending(p) for p in paths).items(), key=lambda x: (-x[1], x[0]))
    shown = ", ".join(f"{n:,} {e}" for e, n in by[:6]) + (", ..." if len(by) > 6 else "")
    plain = list(dict.fromkeys(x.removesuffix(".gz") for x in suffixes))
    gz = " (optionally .gz)" if any(x.endswith(".gz") for x in suffixes) else ""
    log.warning("input %r: left out %s file%s of other kinds (%s; e.g. %s); read as %s are %s%s: convert or rename "
                "the others to include them", directory, f"{len(paths):,}", "" if len(paths) == 1 else "s", shown,
                paths[0], kind, ", ".join(plain), gz)


def describe_inputs(paths: list[Path]) -> list[dict[str, Any]]:
    """Path and checksum of each input; a stage output directory is named by its fingerprint."""
    out = []
    for p in paths:
        if p.is_dir():
            m = p / MANIFEST
            if m.exists():
                out.append({"path": str(p), "fingerprint": json.loads(m.read_text())["fingerprint"]})
            else:
                files = sorted(f for f in p.rglob("*") if f.is_file())
                out.append({"path": str(p), "bytes": sum(f.stat().st_size for f in files),
                            "sha256": sha256_json([[str(f.relative_to(p)), sha256_file(f)] for f in files])})
        else:
            out.append({"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def recorded_config(cfg: Any) -> dict[str, Any]:
    """The config as a manifest records it: runtime-only fields (workers, --overwrite) left out."""
    data = to_dict(cfg)
    for leaf in leaves(type(cfg)):
        if leaf.role == "runtime":
            *head, last = leaf.path.split(".")
            node = data
            for part in head:
                node = node[part]
            node.pop(last, None)
    return data


def fingerprint(stage: str, cfg: Any, inputs: list[dict[str, Any]]) -> str:
    """What decides a stage's output: stage name, recorded config and input checksums."""
    return sha256_json({"stage": stage, "config": recorded_config(cfg), "inputs": inputs})


def make_manifest(stage: str, cfg: Any, inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "fingerprint": fingerprint(stage, cfg, inputs),
        "config": recorded_config(cfg),
        "inputs": inputs,
        "versions": library_versions(),
        **extra,
    }


def read_manifest(directory: str | Path, stage: str | tuple[str, ...] | None = None, what: str = "") -> dict[str, Any]:
    """Read DIR/manifest.json, checking it was written by `stage`; UserError otherwise."""
    d = Path(directory)
    stages = (stage,) if isinstance(stage, str) else stage
    label = what or (f"a `domainlm {stages[0]}` output" if stages else "a domainlm output")
    if not d.is_dir():
        raise UserError(f"{str(d)!r} is not a directory; expected {label}")
    m = d / MANIFEST
    if not m.is_file():
        raise UserError(f"{str(d)!r} has no {MANIFEST}, so it is not {label}")
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{str(m)!r} line {e.lineno}: not valid JSON ({e.msg}); rebuild that directory") from None
    if stages and data.get("stage") not in stages:
        raise UserError(f"{str(d)!r} was made by `domainlm {data.get('stage')}`; expected {label}")
    return data


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log a stage wrote (metrics.jsonl); [] when there is none. A
    last line cut by a crash mid-write is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _under(inner: Path, outer: Path) -> bool:
    """`inner` is `outer` or inside it (both resolved; symlinks followed)."""
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _local(p: str | Path) -> bool:
    return "://" not in str(p)


def refuse_output_over_inputs(output: str | Path, inputs, what: str = "--output") -> None:
    """UserError when the output path is one of the inputs or holds one: writing it would replace
    (and so delete) what the command reads. `inputs`: paths, or `describe_inputs` entries."""
    out = Path(output)
    for p in inputs or ():
        p = p.get("path") if isinstance(p, dict) else p
        if p and _local(p) and _local(out) and _under(Path(p), out):
            same = Path(p).resolve() == out.resolve()
            raise UserError(f"{what} {str(out)!r} {'is' if same else 'holds'} the input {str(p)!r}: writing it would "
                            f"replace the input; choose another {what}")


def check_output_file(path: str | Path, *, inputs=(), ours=None, what: str = "--output") -> Path:
    """A one-file output, checked before any work: not a directory, not one of the inputs (nor
    inside one that is replaced), and, when `ours(text)` is given, an existing file only when it is
    an earlier output of the same command (anything else is refused, not overwritten)."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{what} {str(out)!r} is a directory; give a file path (e.g. {str(out / 'report.json')!r})")
    for p in inputs or ():
        if p and _local(p) and out.exists() and Path(p).exists() and out.resolve() == Path(p).resolve():
            raise UserError(f"{what} {str(out)!r} is the input {str(p)!r}: writing it would replace the input; "
                            f"choose another {what}")
    if ours is not None and out.is_file() and out.stat().st_size:
        try:
            text = out.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or not ours(text):
            raise UserError(f"{what} {str(out)!r} already exists and is not an earlier output of this command; "
                            "choose another path or remove that file")
    return out


def is_json_object(text: str) -> bool:
    """`ours` for the JSON reports: an existing file that is one JSON object."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


_HOST = socket.gethostname().replace("/", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's process
    return True


class StageOutput:
    """Write a stage's output directory atomically.

    with StageOutput(cfg.output, "tokenizer train", overwrite=cfg.overwrite) as out:
        ... write files under out.tmp ...
        out.commit(manifest)

    The directory is refused if it holds anything but an earlier output of the same stage
    (unless `overwrite`), and always if it is or holds one of the `inputs` (or, at `commit`, one of
    the manifest's). Files go to a hidden sibling; `commit` writes the manifest and moves
    it into place; an exception removes it, so nothing half-written is left.
    """

    def __init__(self, path: str | Path, stage: str, *, overwrite: bool = False, inputs=()):
        self.path = Path(path)
        self.stage = stage
        refuse_output_over_inputs(self.path, inputs)   # the same check runs on the manifest's inputs at commit
        if self.path.exists():
            if not self.path.is_dir():
                raise UserError(f"output {str(self.path)!r} is a file; choose a directory path")
            contents = sorted(p.name for p in self.path.iterdir())
            if contents and not overwrite:
                owner = None
                if (self.path / MANIFEST).is_file():
                    try:
                        owner = json.loads((self.path / MANIFEST).read_text()).get("stage")
                    except (json.JSONDecodeError, OSError):
                        owner = None
                if owner != stage:
                    shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
                    raise UserError(
                        f"output directory {str(self.path)!r} already holds something else ({shown}); "
                        "choose an empty or new directory, or pass --overwrite to replace it"
                    )
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{_HOST}-{os.getpid()}"

    def __enter__(self) -> "StageOutput":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def remove_leftovers(self) -> list[Path]:
        """Remove the hidden siblings that killed runs of this output left on this host (a
        SIGKILL or a lost machine skips __exit__): `.NAME.tmp-HOST-PID` and `.NAME.old-PID` whose
        process no longer exists here. Those of another host, or of a live process, are kept."""
        removed = []
        for p in self.path.parent.glob(f".{globlib.escape(self.path.name)}.*-*"):
            kind, _, owner = p.name[len(self.path.name) + 2:].partition("-")
            host, _, pid = owner.rpartition("-")
            if kind not in ("tmp", "old") or not pid.isdigit() or host not in ("", _HOST) or _alive(int(pid)):
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (process %s, %s)", p, pid, human_bytes(size))
            removed.append(p)
        return removed

    def commit(self, manifest: dict[str, Any]) -> None:
        # The last line of defence for a command that did not pass its inputs up front: replacing
        # the directory would delete an input that lies in it.
        refuse_output_over_inputs(self.path, manifest.get("inputs"))
        write_json(self.tmp / MANIFEST, manifest)
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            self.path.rename(old)
            self.tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
