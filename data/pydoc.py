"""The embedded default corpus: API documentation of installed packages.

Every install of domainlm carries real domain text: the docstrings of the Python standard
library and of the packages domainlm depends on (numpy, torch, datasets, apache_beam, peft).
They are read from source with `ast`, never imported, so nothing runs, nothing is downloaded and
the output depends only on the package versions. Docstrings that C code attaches at import time
(`add_docstr(torch.abs, ...)`, numpy's `add_newdoc(...)`) are read from those calls, and the
C-implemented standard-library modules (math, itertools, ...) are imported, which runs no code
of note.

corpus.jsonl: {"id": "json.dumps", "text": "json.dumps(obj, *, ...)\\n\\n<docstring>", "source": "stdlib/json/__init__.py:183"}
qa.jsonl:     {"id", "symbol", "question", "answer", "source", "split"}; a symbol's pairs are all
              in "train" or all in "test".
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, make_manifest
from domainlm.progress import human_bytes, log, progress, summary
from domainlm.data.config import PydocConfig

# Directories that hold tests, vendored code, demos or tools rather than API documentation.
SKIP_DIRS = {
    "test", "tests", "testing", "_tests", "idlelib", "turtledemo", "lib2to3", "ensurepip",
    "site-packages", "dist-packages", "__pycache__", "_vendor", "vendor", "benchmarks",
    "examples", "pydoc_data", "__phello__",
}
# Standard-library modules implemented in C whose docstrings are only reachable by import.
# A fixed list keeps the output the same on every build of Python 3.11+.
C_STDLIB = (
    "array", "binascii", "builtins", "cmath", "errno", "fcntl", "gc", "grp", "itertools",
    "marshal", "math", "mmap", "posix", "pwd", "resource", "select", "sys", "syslog", "termios",
    "time", "unicodedata", "zlib",
)


@dataclass(slots=True)
class Entry:
    id: str
    kind: str  # module | class | function | method
    signature: str
    doc: str
    source: str

    def text(self) -> str:
        head = {"module": f"Module {self.id}", "class": f"class {self.id}{self.signature}"}.get(
            self.kind, f"{self.id}{self.signature}"
        )
        return f"{head}\n\n{self.doc}"


# ---------------------------------------------------------------------------------------------
# Locating sources


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def package_root(name: str) -> tuple[Path, str]:
    """(directory holding the package's top-level folder, version) for a package or 'stdlib'."""
    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"]), sys.version.split()[0]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {name!r} is not installed (or is not a package); check --packages")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    # The import name is not always the distribution's (megatron -> megatron-core).
    dists = _distributions().get(name, []) + [name, name.replace("_", "-")]
    for dist in dists:
        try:
            return root, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return root, "unknown"


def source_files(name: str) -> list[tuple[Path, str, str]]:
    """(file, module name, source label) for every .py file of a package, in sorted order."""
    root, _ = package_root(name)
    if name == "stdlib":
        files = [p for p in root.rglob("*.py")]
        label_root = "stdlib"
    else:
        files = list((root / name).rglob("*.py"))
        label_root = ""
    out = []
    for p in sorted(files):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if rel.parts[0].startswith("config-"):  # stdlib's build configuration folder
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any("-" in part for part in parts):
            continue
        if parts[-1] == "__main__" or parts[-1].startswith("test_") or parts[-1] == "conftest":
            continue
        label = f"{label_root}/{rel.as_posix()}" if label_root else rel.as_posix()
        out.append((p, ".".join(parts), label))
    return out


def public_module(module: str) -> str:
    """The public module a private one re-exports from: numpy._core.fromnumeric -> numpy.

    numpy and torch define much of their API in private modules and re-export it higher up; the
    public spelling is what users write. '' for a private top-level module (stdlib's _pyio).
    """
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_"):
            return ".".join(parts[:i])
    return module


def public_name(dotted: str) -> str:
    """public_module applied to the module part of a dotted name whose last part is the symbol."""
    module, _, attr = dotted.rpartition(".")
    head = public_module(module) if module else ""
    return f"{head}.{attr}" if head else dotted


# ---------------------------------------------------------------------------------------------
# Extraction from source


def _signature(args: ast.arguments, drop_first: bool) -> str:
    a = ast.arguments(
        posonlyargs=list(args.posonlyargs), args=list(args.args), vararg=args.vararg,
        kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults, kwarg=args.kwarg,
        defaults=list(args.defaults),
    )
    if drop_first:
        if a.posonlyargs:
            a.posonlyargs = a.posonlyargs[1:]
        elif a.args:
            a.args = a.args[1:]
    try:
        return f"({ast.unparse(a)})"
    except Exception:  # unparse of exotic defaults; the docstring matters more
        return "(...)"


def _string_arg(node: ast.AST) -> str | None:
    """A docstring argument: a string literal, or a literal with .format(...) applied."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
            and isinstance(node.func.value.value, str)):
        return node.func.value.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_arg(node.left), _string_arg(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def entries_from_source(path: Path, module: str, label: str) -> Iterator[Entry]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return  # a template or a file for another Python version; it documents nothing we read
    public = public_module(module)
    if not public:
        return  # a private top-level module (stdlib's _pyio): its API is documented elsewhere
    doc = ast.get_docstring(tree, clean=True)
    if doc and public == module:
        yield Entry(module, "module", "", doc, f"{label}:1")

    def walk(body: list[ast.stmt], prefix: str, in_class: bool) -> Iterator[Entry]:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                name = f"{prefix}.{node.name}"
                d = ast.get_docstring(node, clean=True)
                if isinstance(node, ast.ClassDef):
                    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                    sig = _signature(init.args, drop_first=True) if init else ""
                    if d:
                        yield Entry(name, "class", sig, d, f"{label}:{node.lineno}")
                    yield from walk(node.body, name, True)
                else:
                    is_static = any(_dotted(x) == "staticmethod" for x in node.decorator_list)
                    if d:
                        kind = "method" if in_class else "function"
                        yield Entry(name, kind, _signature(node.args, in_class and not is_static),
                                    d, f"{label}:{node.lineno}")
            elif isinstance(node, ast.If):  # platform branches define the API too
                yield from walk(node.body, prefix, in_class)
                yield from walk(node.orelse, prefix, in_class)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not in_class:
                yield from _attached_doc(node.value, label)

    yield from walk(tree.body, public, False)


def _attached_doc(call: ast.Call, label: str) -> Iterator[Entry]:
    """Docstrings that C code receives at import time, read from the calls that attach them:
    torch's add_docstr(torch.abs, "...") and add_docstr_all("add", "...") (Tensor methods), and
    numpy's add_newdoc("numpy._core.multiarray", "ndarray", ("sum", "...")).
    """
    fname = _dotted(call.func) or ""
    last = fname.rsplit(".", 1)[-1]
    where = f"{label}:{call.lineno}"
    if last in ("add_docstr", "_add_docstr") and len(call.args) >= 2:
        target, doc = _dotted(call.args[0]), _string_arg(call.args[1])
        if target and doc:
            yield Entry(public_name(target), "function", "", inspect.cleandoc(doc), where)
    elif last == "add_docstr_all" and len(call.args) >= 2:
        method, doc = _string_arg(call.args[0]), _string_arg(call.args[1])
        if method and doc and not method.startswith("_"):
            yield Entry(f"torch.Tensor.{method}", "method", "", inspect.cleandoc(doc), where)
    elif last == "add_newdoc" and len(call.args) >= 3:
        place, obj = _string_arg(call.args[0]), _string_arg(call.args[1])
        if not place or not obj:
            return
        owner = public_name(f"{place}.{obj}")
        arg = call.args[2]
        items = arg.elts if isinstance(arg, ast.List) else [arg]
        for item in items:
            if isinstance(item, ast.Tuple) and len(item.elts) == 2:
                attr, doc = _string_arg(item.elts[0]), _string_arg(item.elts[1])
                if attr and doc and not attr.startswith("_"):
                    yield Entry(f"{owner}.{attr}", "method", "", inspect.cleandoc(doc), where)
            else:
                doc = _string_arg(item)
                if doc:
                    yield Entry(owner, "function", "", inspect.cleandoc(doc), where)


def entries_from_c_module(name: str) -> Iterator[Entry]:
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return
    if mod.__doc__:
        yield Entry(name, "module", "", inspect.cleandoc(mod.__doc__), f"stdlib/{name} (C)")
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr)
        if getattr(obj, "__module__", name) not in (name, None) and not inspect.isbuiltin(obj):
            continue
        if inspect.isbuiltin(obj) or inspect.isclass(obj):
            doc = inspect.getdoc(obj) if inspect.isbuiltin(obj) else obj.__doc__
            if not doc or (inspect.isclass(obj) and obj.__module__ != name):
                continue
            sig = getattr(obj, "__text_signature__", None) or ""
            sig = sig.replace("($module, ", "(").replace("($module)", "()").replace("$", "")
            kind = "class" if inspect.isclass(obj) else "function"
            yield Entry(f"{name}.{attr}", kind, sig, inspect.cleandoc(doc), f"stdlib/{name} (C)")
            if inspect.isclass(obj):
                for mname in sorted(vars(obj)):
                    m = vars(obj)[mname]
                    mdoc = getattr(m, "__doc__", None)
                    if mname.startswith("_") or not mdoc or not callable(m):
                        continue
                    msig = (getattr(m, "__text_signature__", None) or "").replace("($self, ", "(").replace("($self)", "()")
                    yield Entry(f"{name}.{attr}.{mname}", "method", msig, inspect.cleandoc(mdoc), f"stdlib/{name} (C)")


# ---------------------------------------------------------------------------------------------
# Question/answer pairs


def summary_sentence(doc: str) -> str | None:
    """The docstring's first paragraph, on one line, if it reads as a summary."""
    para = doc.strip().split("\n\n", 1)[0]
    text = " ".join(para.split())
    if len(text) < 20 or len(text) > 400 or text.startswith((">>>", "..", ":", "-", "=")):
        return None
    if re.match(r"^[\w.]+\(.*\)\s*(->.*)?$", text):  # a signature line, not a sentence
        return None
    return text if text.endswith((".", "!", "?", ":")) else text + "."


_PARAM_SECTION = re.compile(r"^(Parameters|Args|Arguments)\s*:?\s*\n(-{3,}\s*\n)?", re.M)


def parameter_docs(doc: str) -> list[tuple[str, str]]:
    """(name, description) pairs from a numpy-style or Google-style parameter section."""
    m = _PARAM_SECTION.search(doc)
    if not m:
        return []
    numpy_style = m.group(2) is not None  # "Parameters" underlined: "name : type" then the text
    lines = doc[m.end():].split("\n")
    out: list[tuple[str, str]] = []
    cur: list[str] | None = None
    name = ""
    base_indent = None
    for line in lines:
        if not line.strip():
            if cur is not None and cur:
                cur.append("")
            continue
        indent = len(line) - len(line.lstrip())
        if base_indent is None:
            base_indent = indent
        if indent < base_indent or (indent == base_indent and re.match(r"^[A-Z][\w ]+:?\s*$", line.strip()) and not re.match(r"^\w+\s*(\(|:)", line.strip())):
            break  # the next section
        if indent == base_indent:
            pm = re.match(r"^\*{0,2}(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$", line.strip())
            if not pm:
                break
            if cur is not None and name:
                out.append((name, " ".join(" ".join(cur).split())))
            name, cur = pm.group(1), []
            rest = pm.group(3)
            # Google style puts the description after the colon; numpy style puts the type there.
            if rest and not numpy_style:
                cur.append(rest)
        elif cur is not None:
            cur.append(line.strip())
    if cur is not None and name:
        out.append((name, " ".join(" ".join(cur).split())))
    return [(n, d) for n, d in out if 15 <= len(d) <= 400]


def qa_pairs(e: Entry) -> list[dict[str, str]]:
    out = []
    s = summary_sentence(e.doc)
    if s:
        q = f"What is the `{e.id}` module for?" if e.kind == "module" else f"What does `{e.id}` do?"
        out.append({"id": f"{e.id}#summary", "question": q, "answer": s})
    if e.kind in ("function", "method", "class") and e.signature and e.signature not in ("()", "(...)"):
        out.append({"id": f"{e.id}#signature", "question": f"What is the signature of `{e.id}`?",
                    "answer": f"`{e.id}{e.signature}`"})
    for pname, pdoc in parameter_docs(e.doc)[:4]:
        out.append({"id": f"{e.id}#param:{pname}",
                    "question": f"In `{e.id}`, what does the `{pname}` parameter mean?", "answer": pdoc})
    for qa in out:
        qa["symbol"] = e.id
        qa["source"] = e.id
    return out


def in_test_split(symbol: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.blake2b(f"{seed}:qa:{symbol}".encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


# ---------------------------------------------------------------------------------------------
# The command


def collect(cfg: PydocConfig) -> tuple[list[Entry], dict[str, dict]]:
    """Every documented symbol of the configured packages, deduplicated by id (first wins)."""
    jobs: list[tuple[str, Path | None, str, str]] = []
    versions: dict[str, dict] = {}
    for pkg in cfg.packages:
        files = source_files(pkg)
        versions[pkg] = {"version": package_root(pkg)[1], "files": len(files)}
        jobs += [(pkg, p, mod, label) for p, mod, label in files]
        if pkg == "stdlib":
            jobs += [(pkg, None, name, "") for name in C_STDLIB]
    seen: dict[str, Entry] = {}
    per_pkg = {pkg: 0 for pkg in cfg.packages}
    for pkg, path, mod, label in progress(jobs, desc="reading sources", unit="file"):
        found = entries_from_source(path, mod, label) if path is not None else entries_from_c_module(mod)
        for e in found:
            if len(e.doc) < cfg.min_chars or e.id in seen:
                continue
            seen[e.id] = e
            per_pkg[pkg] += 1
    for pkg, n in per_pkg.items():
        versions[pkg]["documents"] = n
    return sorted(seen.values(), key=lambda e: e.id), versions


def build(cfg: PydocConfig) -> dict:
    """Build corpus.jsonl and qa.jsonl under cfg.output; return the manifest."""
    with StageOutput(cfg.output, stages.CORPUS_PYDOC, overwrite=cfg.overwrite) as out:
        entries, packages = collect(cfg)
        if not entries:
            raise UserError(f"no documented symbols found in {', '.join(cfg.packages)}")
        n_bytes = 0
        with open(out.tmp / "corpus.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for e in entries:
                line = json.dumps({"id": e.id, "text": e.text(), "source": e.source}, ensure_ascii=False)
                f.write(line + "\n")
                n_bytes += len(e.text().encode("utf-8"))
        qa_counts = {"train": 0, "test": 0}
        symbols = {"train": 0, "test": 0}
        with open(out.tmp / "qa.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for e in entries:
                pairs = qa_pairs(e)
                if not pairs:
                    continue
                split = "test" if in_test_split(e.id, cfg.qa_test_fraction, cfg.seed) else "train"
                symbols[split] += 1
                for qa in pairs:
                    rec = {"id": qa["id"], "symbol": qa["symbol"], "question": qa["question"],
                           "answer": qa["answer"], "source": qa["source"], "split": split}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    qa_counts[split] += 1
        manifest = make_manifest(
            stages.CORPUS_PYDOC, cfg, inputs(cfg),
            counts={"documents": len(entries), "text_bytes": n_bytes, "qa_pairs": qa_counts,
                    "qa_symbols": symbols},
            packages=packages,
            files={"corpus": "corpus.jsonl", "qa": "qa.jsonl"},
        )
        out.commit(manifest)
    log.info("wrote %s", cfg.output)
    summary("domainlm corpus pydoc", [
        ("output", cfg.output),
        ("documents", f"{len(entries):,}"),
        ("text", human_bytes(n_bytes)),
        *[(f"  {k}", f"{v['documents']:,} docs (v{v['version']}, {v['files']:,} files)") for k, v in packages.items()],
        ("QA pairs", f"{qa_counts['train']:,} train / {qa_counts['test']:,} test "
                     f"({symbols['train']:,} / {symbols['test']:,} symbols)"),
    ])
    return manifest


def inputs(cfg: PydocConfig) -> list[dict]:
    """What the corpus depends on: the packages and their versions (for `domainlm run`)."""
    return [{"package": p, "version": package_root(p)[1]} for p in cfg.packages]


def long_documents(docs: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The corpus regrouped into one long document per module, for the long-document retrieval
    dev set (bench/retrieval.py, the tests): a reference page per module, as manuals are.

    `docs` are corpus records {"id", "text"}; a symbol goes to the longest dotted prefix of its
    id that is a module's id (text starting "Module "), else to its first component. Each page is
    Markdown: `# <module>` and the module's text, then `## <symbol>` and its text for every
    member, in corpus order. Returns (the pages as records {"id", "text", "source"}, symbol id ->
    page id) so QA items' doc_ids can be mapped to the page."""
    modules = {d["id"] for d in docs if d["text"].startswith("Module ")}

    def page(symbol: str) -> str:
        parts = symbol.split(".")
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in modules:
                return prefix
        return parts[0]

    groups: dict[str, list[dict]] = {}
    mapping: dict[str, str] = {}
    for d in docs:
        mapping[d["id"]] = page(d["id"])
        groups.setdefault(mapping[d["id"]], []).append(d)
    pages = []
    for pid, members in groups.items():
        head = [d for d in members if d["id"] == pid]
        rest = [d for d in members if d["id"] != pid]
        parts = [f"# {pid}\n\n{d['text']}" for d in head] or [f"# {pid}"]
        parts += [f"## {d['id']}\n\n{d['text']}" for d in rest]
        pages.append({"id": pid, "text": "\n\n".join(parts), "source": f"module page {pid}"})
    return pages, mapping
