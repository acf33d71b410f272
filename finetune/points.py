"""Training points: teach each behaviour with its own examples, check it with its own test cases.

    # --points configs/points/pydoc.yaml
    points:
      - name: signature_in_backticks
        description: answer a signature question with the call in backticks, nothing else
        repeat: 4                      # copies of the examples in the training data (default 1)
        examples:                      # any record format of --data
          - {question: "What is the signature of `json.dumps`?", answer: "`json.dumps(obj, ...)`"}
          - messages: [{role: user, content: ...}, {role: assistant, content: ...}]
        tests:
          - prompt: "What is the signature of `os.path.join`?"    # a user message, or a list of messages
            expect: regex                                           # exact | contains | regex | not_contains
            value: "^`os\\.path\\.join\\("
            ignore_case: false                                      # optional

Every test runs before and after training (greedy, with the chat template); a point's pass rate is
the share of its tests passed, and a point whose rate falls is marked in the summary and the
manifest. Malformed examples are dead letters like bad data records, named by point and index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.config import read_yaml
from domainlm.errors import UserError
from domainlm.finetune.records import Bad, Example, ReadStats, excerpt, to_messages

EXPECTS = ("exact", "contains", "regex", "not_contains")


@dataclass(slots=True)
class Test:
    messages: list[dict[str, str]]
    expect: str
    value: str
    ignore_case: bool = False

    def passes(self, answer: str) -> bool:
        a, v = answer.strip(), self.value
        if self.ignore_case and self.expect != "regex":
            a, v = a.lower(), v.lower()
        if self.expect == "exact":
            return a == v.strip()
        if self.expect == "contains":
            return v in a
        if self.expect == "not_contains":
            return v not in a
        return re.search(v, a, re.IGNORECASE if self.ignore_case else 0) is not None


@dataclass(slots=True)
class Point:
    name: str
    description: str
    repeat: int
    examples: list[Example] = field(default_factory=list)
    tests: list[Test] = field(default_factory=list)


def read_points(path: str, stats: ReadStats) -> list[Point]:
    data = read_yaml(path, what="points file")
    if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not data["points"]:
        raise UserError(f"points file {path!r}: the top level must be `points:` with a list of points "
                        "(name, examples, tests)")
    stats.files.append({"path": str(path), "bytes": Path(path).stat().st_size})
    out, names = [], set()
    for i, raw in enumerate(data["points"]):
        where = f"points file {path!r}, point {i + 1}"
        if not isinstance(raw, dict):
            raise UserError(f"{where}: a point is a mapping with name, examples and tests")
        unknown = set(raw) - {"name", "description", "repeat", "examples", "tests"}
        if unknown:
            raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}; keys are name, description, repeat, "
                            "examples, tests")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: give it a `name`")
        if name in names:
            raise UserError(f"{where}: the name {name!r} is used twice")
        names.add(name)
        where = f"points file {path!r}, point {name!r}"
        repeat = raw.get("repeat", 1)
        if not isinstance(repeat, int) or repeat < 1:
            raise UserError(f"{where}: `repeat` must be a positive integer")
        point = Point(name=name, description=str(raw.get("description") or ""), repeat=repeat)
        for j, rec in enumerate(raw.get("examples") or []):
            stats.records += 1
            try:
                if not isinstance(rec, dict):
                    raise Bad("not_an_object", f"a {type(rec).__name__}, not a record")
                msgs, fmt = to_messages(rec)
            except Bad as bad:
                stats.drop(f"{path}#{name}", j + 1, bad.reason, f"example {j + 1}: {bad.message}", excerpt(rec))
                continue
            stats.kept += 1
            stats.by_format[fmt] += 1
            point.examples.append(Example(messages=msgs, source=f"{path}:point {name} #{j + 1}", format=fmt))
        tests = raw.get("tests")
        if not isinstance(tests, list) or not tests:
            raise UserError(f"{where}: give `tests`, a list of {{prompt, expect, value}}")
        for j, t in enumerate(tests):
            point.tests.append(_test(t, f"{where}, test {j + 1}"))
        out.append(point)
    return out


def _test(t: Any, where: str) -> Test:
    if not isinstance(t, dict):
        raise UserError(f"{where}: a test is a mapping {{prompt, expect, value}}")
    unknown = set(t) - {"prompt", "expect", "value", "ignore_case"}
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}; keys are prompt, expect, value, ignore_case")
    prompt = t.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in prompt]
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: a prompt given as messages must end with a user message")
    else:
        raise UserError(f"{where}: `prompt` must be a non-empty string or a list of messages")
    expect = t.get("expect")
    if expect not in EXPECTS:
        raise UserError(f"{where}: `expect` is {expect!r}; use one of {', '.join(EXPECTS)}")
    value = t.get("value")
    if not isinstance(value, str) or (expect != "not_contains" and not value):
        raise UserError(f"{where}: `value` must be a non-empty string")
    if expect == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise UserError(f"{where}: `value` is not a valid regular expression ({e})") from None
    return Test(messages=messages, expect=expect, value=value, ignore_case=bool(t.get("ignore_case", False)))


def training_examples(points: list[Point]) -> list[Example]:
    return [ex for p in points for _ in range(p.repeat) for ex in p.examples]


def run_points(points: list[Point], answer_fn) -> dict[str, Any]:
    """{name: {passed, tests, rate, results: [{prompt, expect, value, answer, passed}]}}."""
    tests = [(p.name, t) for p in points for t in p.tests]
    answers = answer_fn([t.messages for _, t in tests])
    out: dict[str, Any] = {p.name: {"passed": 0, "tests": len(p.tests), "results": []} for p in points}
    for (name, t), a in zip(tests, answers):
        ok = t.passes(a)
        out[name]["passed"] += ok
        out[name]["results"].append({"prompt": t.messages[-1]["content"], "expect": t.expect, "value": t.value,
                                     "answer": a, "passed": ok})
    for v in out.values():
        v["rate"] = v["passed"] / v["tests"]
    return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per point: rate before and after, and whether it fell."""
    return {name: {"before": before[name]["rate"], "after": after[name]["rate"],
                   "fell": after[name]["rate"] < before[name]["rate"], "tests": after[name]["tests"]}
            for name in after}
