"""The prompt library ("prompt learning" without training): versioned YAML templates for zero-shot
and few-shot QA, and the chat messages they make.

A template is an optional system message and a user message with {question} (and {domain});
few-shot prepends k worked examples from the QA train data as earlier user/assistant turns, in
the same template, so the model sees the answer format it is asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from domainlm.config import read_yaml
from domainlm.errors import UserError
from domainlm.qa import QA

_PLACEHOLDERS = ("question", "domain")


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    user: str
    system: str | None = None


@dataclass(slots=True)
class PromptLibrary:
    path: str
    version: int
    domain: str
    templates: dict[str, Template]
    shots: list[int] = field(default_factory=list)

    def template(self, name: str) -> Template:
        if name not in self.templates:
            raise UserError(f"{self.path}: no template {name!r}; templates: {', '.join(self.templates)}")
        return self.templates[name]

    def messages(self, name: str, question: str, examples: list[QA] = ()) -> list[dict[str, str]]:
        t = self.template(name)
        fill = {"domain": self.domain}
        out: list[dict[str, str]] = []
        if t.system:
            out.append({"role": "system", "content": t.system.format(**fill, question="")})
        for ex in examples:
            out.append({"role": "user", "content": t.user.format(**fill, question=ex.question)})
            out.append({"role": "assistant", "content": ex.answer})
        out.append({"role": "user", "content": t.user.format(**fill, question=question)})
        return out


def load_library(path: str | Path, domain: str = "") -> PromptLibrary:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt library {str(p)!r} not found; give a YAML file like configs/prompts/qa.yaml")
    raw = read_yaml(p)
    if not isinstance(raw.get("templates"), dict) or not raw["templates"]:
        raise UserError(f"{p}: a prompt library needs `templates:` with at least one template")
    templates = {}
    for name, t in raw["templates"].items():
        if not isinstance(t, dict) or not isinstance(t.get("user"), str):
            raise UserError(f"{p}: template {name!r} needs a `user:` message (and optionally `system:`)")
        for part in ("user", "system"):
            text = t.get(part)
            if text is None:
                continue
            try:
                text.format(**{k: "" for k in _PLACEHOLDERS})
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"{p}: template {name!r} {part}: bad placeholder {e}; use {{question}} and "
                                "{domain} (double other braces: {{ }})") from None
        if "{question}" not in t["user"]:
            raise UserError(f"{p}: template {name!r}: the user message must contain {{question}}")
        templates[str(name)] = Template(name=str(name), user=t["user"], system=t.get("system"))
    shots = [int(k) for k in (raw.get("few_shot") or {}).get("shots", [])]
    return PromptLibrary(path=str(p), version=int(raw.get("version", 1)),
                         domain=domain or str(raw.get("domain", "the subject of these documents")),
                         templates=templates, shots=shots)


def pick_examples(pool: list[QA], k: int, seed: int, avoid: str | None = None) -> list[QA]:
    """k examples from the train pool, seeded; never one about the same document as the question."""
    if k <= 0 or not pool:
        return []
    rng = random.Random(seed)
    picked: list[QA] = []
    for qa in rng.sample(pool, min(len(pool), 4 * k)):
        if avoid is None or qa.doc_id != avoid:
            picked.append(qa)
        if len(picked) == k:
            break
    return picked
