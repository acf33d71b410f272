"""The layering rule of ARCHITECTURE.md, checked on the source: every module's imports (module-level
and function-level alike) are read with `ast`.

1. A stage imports the core and the stages before it, never one after it:
   core <- tokenizer <- data <- pretrain <- finetune <- serve <- eval. `launch` is a leaf beside
   the core (it builds command lines; it imports the core only).
2. A stage reads another stage only through that stage's public modules (its contract classes and
   the few functions later stages are meant to reuse), never its internals.
3. No import cycles between modules, function-level imports included (a cycle hidden behind an
   import inside a function is still a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package prefix -> folder (pyproject.toml's package-dir)
FOLDERS = {
    "domainlm": "domainlm", "domainlm.tokenizer": "tokenizer", "domainlm.data": "data",
    "domainlm.pretrain": "pretrain", "domainlm.finetune": "finetune", "domainlm.serve": "serve",
    "domainlm.eval": "eval", "domainlm.launch": "launch", "domainlm.configs": "configs",
}
RANK = {"core": 0, "launch": 0, "tokenizer": 1, "data": 2, "pretrain": 3, "finetune": 4, "serve": 5, "eval": 6}

# What later stages may import of a stage: its contract modules, plus what is there to be reused.
PUBLIC = {
    "tokenizer": {
        "domainlm.tokenizer.tokdir",        # the tokenizer dir contract
        "domainlm.tokenizer.hf_export",     # HF <-> SentencePiece parity check (convert's imported tokenizers)
    },
    "data": {
        "domainlm.data.shards",             # the shards dir contract
    },
    "pretrain": {
        "domainlm.pretrain.checkpoint",     # the checkpoint dir contract
        "domainlm.pretrain.convert.hfdir",  # the HF dir contract
        "domainlm.pretrain.convert.verify",  # logits parity of two models (merge verifies as to-hf does)
        "domainlm.pretrain.convert.gguf_export",  # the GGUF export (convert to-gguf merges an adapter first, in finetune)
        "domainlm.pretrain.kernels",        # the Triton kernels (fine-tuning applies them to HF Llama)
    },
    "finetune": {
        "domainlm.finetune.adapter",        # the adapter dir contract
        "domainlm.finetune.kernels",        # fuse_lora: evaluation's generation runs adapters through it
    },
    "serve": {
        "domainlm.serve.index_dir",         # the index dir contract
        "domainlm.serve.retrieve",          # retrieval and RAG prompts, reused by evaluation
        "domainlm.serve.prompt",
        "domainlm.serve.config",            # the retrieval settings (RetrievalArgs), shared by eval's configs
    },
    "eval": set(),
    "launch": {"domainlm.launch.command"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        root = REPO / folder
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            # a file of domainlm/ that is itself a stage folder's module is listed under that stage
            if pkg == "domainlm" and parts and f"domainlm.{parts[0]}" in FOLDERS:
                continue
            out[name] = f
    return out


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and f"domainlm.{parts[1]}" in FOLDERS and parts[1] != "configs":
        return parts[1]
    return "core"


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """domainlm modules `module` imports anywhere in its file (resolved to modules that exist)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for n in names:
            if not n.startswith("domainlm"):
                continue
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != module and n != "domainlm":
                found.add(n)
    # `from domainlm.x import y` adds both x and x.y when y is a module: keep the deepest
    return {n for n in found if not any(o.startswith(n + ".") for o in found)} | \
        {n for n in found if n.count(".") >= 2 and n in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_the_modules_are_found(graph):
    stages_seen = {stage_of(m) for m in graph}
    assert {"core", "tokenizer", "data", "pretrain", "launch"} <= stages_seen
    assert "domainlm.data.shards" in graph and "domainlm.pretrain.checkpoint" in graph
    assert graph["domainlm.pretrain.trainer"] >= {"domainlm.pretrain.checkpoint", "domainlm.data.shards"}


def test_no_stage_imports_a_later_stage(graph):
    bad = []
    for m, deps in graph.items():
        s = stage_of(m)
        for d in deps:
            t = stage_of(d)
            if t == s or t == "core":
                continue
            if s == "launch" or t == "launch" or RANK[t] > RANK[s] or (s == "core" and t != "core"):
                bad.append(f"{m} ({s}) imports {d} ({t})")
    assert not bad, "later-stage imports:\n" + "\n".join(sorted(bad))


def test_stages_read_each_other_only_through_their_public_modules(graph):
    bad = []
    for m, deps in graph.items():
        s = stage_of(m)
        for d in deps:
            t = stage_of(d)
            if t in (s, "core"):
                continue
            public = PUBLIC[t]
            if not any(d == p or d.startswith(p + ".") for p in public):
                bad.append(f"{m} ({s}) reaches into {d}, an internal module of {t}; use {sorted(public)}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles(graph):
    color: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        color[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if color.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in color:
                visit(d, stack)
        stack.pop()
        color[n] = 2

    for n in sorted(graph):
        if n not in color:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
