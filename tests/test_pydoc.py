"""The embedded pydoc corpus: real docstrings, deterministic bytes, QA split by symbol."""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

from domainlm.data.config import PydocConfig
from domainlm.data.pydoc import build, parameter_docs, public_name, summary_sentence


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_holds_real_docstrings(pydoc_corpus):
    docs = {r["id"]: r for r in _records(pydoc_corpus / "corpus.jsonl")}
    # Compare with the docstring as Python's own parser reads it from the stdlib source.
    src = Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py"
    fn = next(n for n in ast.parse(src.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "dumps")
    dumps = docs["json.dumps"]
    assert dumps["text"].startswith("json.dumps(obj, *, skipkeys=False")
    assert dumps["text"].endswith(ast.get_docstring(fn, clean=True))
    assert dumps["source"] == f"stdlib/json/__init__.py:{fn.lineno}"
    assert docs["math.sqrt"]["text"] == "math.sqrt(x, /)\n\nReturn the square root of x."  # C module
    assert "numpy.sum" in docs and "Sum of array elements" in docs["numpy.sum"]["text"]  # private module, public id
    assert "peft.LoraConfig" in docs or any(k.startswith("peft.tuners.lora") for k in docs)
    assert not any(k.startswith(("test.", "idlelib", "_")) for k in docs)
    assert list(docs) == sorted(docs)  # sorted by id: stable order


def test_manifest_counts_match_files(pydoc_corpus):
    m = json.loads((pydoc_corpus / "manifest.json").read_text())
    corpus = _records(pydoc_corpus / "corpus.jsonl")
    qa = _records(pydoc_corpus / "qa.jsonl")
    assert m["stage"] == "corpus pydoc"
    assert m["counts"]["documents"] == len(corpus)
    assert m["counts"]["text_bytes"] == sum(len(r["text"].encode()) for r in corpus)
    assert m["counts"]["qa_pairs"]["train"] == sum(r["split"] == "train" for r in qa)
    assert m["counts"]["qa_pairs"]["test"] == sum(r["split"] == "test" for r in qa)
    assert {p["package"] for p in m["inputs"]} == {"stdlib", "numpy", "datasets", "peft"}


def test_qa_split_has_no_symbol_in_both(pydoc_corpus):
    qa = _records(pydoc_corpus / "qa.jsonl")
    train = {r["symbol"] for r in qa if r["split"] == "train"}
    test = {r["symbol"] for r in qa if r["split"] == "test"}
    assert train and test and not train & test
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.15  # qa_test_fraction 0.1
    ids = {r["id"] for r in _records(pydoc_corpus / "corpus.jsonl")}
    assert all(r["source"] in ids for r in qa)  # every answer traces to a corpus document
    by_id = {r["id"]: r for r in qa}
    assert by_id["json.dumps#summary"]["question"] == "What does `json.dumps` do?"
    assert by_id["json.dumps#summary"]["answer"] == "Serialize ``obj`` to a JSON formatted ``str``."


def test_same_packages_give_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(PydocConfig(output=str(a), packages=["stdlib"]))
    build(PydocConfig(output=str(b), packages=["stdlib"]))
    for name in ("corpus.jsonl", "qa.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    ma["config"].pop("output"), mb["config"].pop("output")
    assert ma["counts"] == mb["counts"] and ma["inputs"] == mb["inputs"]


def test_helpers():
    assert public_name("numpy._core.fromnumeric.sum") == "numpy.sum"
    assert public_name("torch._C._nn.gelu") == "torch.gelu"
    assert public_name("json.dumps") == "json.dumps"
    assert summary_sentence("Return the thing\nacross lines\n\nMore.") == "Return the thing across lines."
    assert summary_sentence("f(x) -> int") is None
    numpy_style = "Do it.\n\nParameters\n----------\na : int\n    The first value to add.\nb : str, optional\n    Name of the result column.\n\nReturns\n-------\nint\n"
    assert parameter_docs(numpy_style) == [("a", "The first value to add."), ("b", "Name of the result column.")]
    google = "Do it.\n\nArgs:\n    path (str): Where the file is written.\n    n: How many rows to keep.\n\nReturns:\n    None\n"
    assert parameter_docs(google) == [("path", "Where the file is written."), ("n", "How many rows to keep.")]
