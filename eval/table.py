"""The comparison table: compare.md (markdown) and the report page's HTML, from compare.json's dict.

Exact match and F1 carry their 95% bootstrap intervals over questions, "F1 vs best" the paired
difference to the best approach (`eval/stats.py`); rows are grouped by family (an existing base
model first, then `scratch/...`) when both are present, and the verdict is the paragraph under it.
"""

from __future__ import annotations

import html
from typing import Any

from domainlm.eval.stats import SCRATCH, family, is_tie

COLUMNS = ["approach", "exact match", "F1", "F1 vs best", "contains", "answer in sources (F1 in / out)",
           "citation ok", "faithful", "agree (phrasings)",
           "agree (seeds)", "p50 / p95 s", "cost /1k q", "training", "test items in training data (13-gram)"]
RIGHT = {"exact match", "F1", "F1 vs best", "contains", "answer in sources (F1 in / out)", "citation ok", "faithful", "agree (phrasings)", "agree (seeds)",
         "p50 / p95 s", "cost /1k q"}
FAMILY_TITLES = {"base": "existing base model", SCRATCH: "trained from scratch"}


def _with_interval(r: dict[str, Any], metric: str) -> str:
    iv = (r.get("intervals") or {}).get(metric)
    if r.get(metric) is None:
        return "-"
    return f"{r[metric]:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")


def _signed(x: float) -> str:
    """+0.05, -0.12, 0.00 (never -0.00)."""
    x = round(x, 2) + 0.0
    return f"{x:+.2f}" if x else "0.00"


def _vs_best(name: str, report: dict[str, Any]) -> str:
    if name == report.get("best"):
        return "best"
    d = (report["approaches"][name].get("paired_vs_best") or {}).get("f1")
    if not d:
        return "-"
    text = f"{_signed(d['diff'])} [{_signed(d['lo'])}, {_signed(d['hi'])}]"
    return f"tie ({text})" if is_tie(d) else text


def _in_sources(r: dict[str, Any]) -> str:
    """Share of questions whose answer was in the sources, and F1 when it was / was not."""
    s = r.get("answer_in_sources")
    if not s:
        return "-"
    f1 = lambda part: f"{part['f1']:.2f}" if part.get("f1") is not None else "-"  # noqa: E731
    return f"{s['present']['share']:.2f} ({f1(s['present'])} / {f1(s['absent'])})"


def _cells(name: str, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
    cost = r.get("cost") or {}
    unit = "gpu_s_per_1k_questions" if "gpu_s_per_1k_questions" in cost else "cpu_s_per_1k_questions"
    train = r.get("training") or {}
    train_s = "-"
    if train:
        tok = f", {train['tokens']:,} tok" if train.get("tokens") is not None else ""
        secs = f"{train['train_seconds']:.0f} s" if train.get("train_seconds") is not None else "? s"
        if train.get("adapter_seconds") is not None:          # cpt+...: the CPT run and the adapter
            cpt = f"{train['cpt_seconds']:.0f} s" if train.get("cpt_seconds") is not None else "unknown"
            secs += f" (CPT {cpt} + adapter {train['adapter_seconds']:.0f} s)"
        if train.get("parts"):                                 # +dpo: SFT, the pairs, DPO
            secs += " (" + " + ".join(f"{k} {v:.0f} s" if v is not None else f"{k} ?"
                                      for k, v in train["parts"].items()) + ")"
        train_s = f"{secs}{tok}" + (" (resumed)" if train.get("resumed_at") else "")
    contam = "; ".join(f"{src}: {v['any']}/{v['items']}" for src, v in (r.get("decontamination") or {}).items()) or "-"
    three = lambda k: f"{r[k]:.3f}" if r.get(k) is not None else "-"  # noqa: E731
    cons = r.get("consistency") or {}
    lat = r.get("latency") or {}
    return [name, _with_interval(r, "exact_match"), _with_interval(r, "f1"), _vs_best(name, report),
            three("contains"), _in_sources(r), three("citation_correct"), three("faithfulness"),
            f"{cons['phrasings']:.2f}" if "phrasings" in cons else "-",
            f"{cons['seeds']:.2f}" if "seeds" in cons else "-",
            f"{lat['p50_s']:.3f} / {lat['p95_s']:.3f}" if "p50_s" in lat else "-",
            f"{cost[unit]:.1f} {unit.split('_')[0].upper()}-s" if unit in cost else "-", train_s, contam]


def groups(report: dict[str, Any]) -> list[tuple[str | None, list[str]]]:
    """[(family title or None, approach names)]: one untitled group, or base then scratch when both exist."""
    names = list(report["approaches"])
    fams = [f for f in ("base", SCRATCH) if any(family(n) == f for n in names)]
    if len(fams) < 2:
        return [(None, names)]
    return [(FAMILY_TITLES[f], [n for n in names if family(n) == f]) for f in fams]


def footnote(report: dict[str, Any]) -> str:
    c = report.get("prompt_choice") or {}
    pct = round(100 * report.get("confidence", 0.95))
    cut = ", ".join(f"{n} {r['truncated']}" for n, r in report["approaches"].items() if r.get("truncated"))
    budgets = report.get("answer_budget") or {}
    budget = ", ".join(f"{b['max_new_tokens']} tokens" + (f" ({fam})" if len(budgets) > 1 else "")
                       for fam, b in budgets.items())
    if budget and any(b.get("auto") for b in budgets.values()):
        budget += ", from the QA train answers' lengths"
    return (f"{report['questions']} held-out questions on {report.get('device', '?')}. Brackets: {pct}% bootstrap "
            f"intervals over questions; F1 vs best: the paired difference to {report.get('best') or 'the best'} on the "
            "same questions, \"tie\" when its interval includes 0. Prompt picked on "
            f"{c.get('dev_questions', 0)} dev questions (from the train split): template `{c.get('template')}`, "
            f"{c.get('shots')} shots (library version {c.get('library_version', '?')}). The index holds the gold "
            "documents by design: RAG is meant to find the answer there."
            + (f" Answers up to {budget}." if budget else "")
            + (f" Prompts cut to fit the model's context (their end kept, the start lost): {cut}." if cut else ""))


def markdown_table(report: dict[str, Any]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |",
            "| " + " | ".join("---:" if c in RIGHT else "---" for c in COLUMNS) + " |"]
    for title, names in groups(report):
        if title:
            rows.append(f"| **{title}** |" + " |" * (len(COLUMNS) - 1))
        for name in names:
            rows.append("| " + " | ".join(_cells(name, report["approaches"][name], report)) + " |")
    rows.append("")
    if report.get("verdict"):
        rows += [report["verdict"], ""]
    rows.append(footnote(report))
    return "\n".join(rows) + "\n"


def html_table(report: dict[str, Any]) -> str:
    """The same table as HTML (escaped), the verdict as a paragraph under it, then the footnote."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = []
    for title, names in groups(report):
        if title:
            body.append(f"<tr><th colspan='{len(COLUMNS)}' class='group'>{e(title)}</th></tr>")
        for name in names:
            cells = _cells(name, report["approaches"][name], report)
            cls = " class='best'" if name == report.get("best") else ""
            body.append(f"<tr{cls}>" + "".join(
                f"<td{' class=num' if c in RIGHT else ''}>{e(v)}</td>" for c, v in zip(COLUMNS, cells)) + "</tr>")
    out = f"<table class='compare'><tr>{head}</tr>{''.join(body)}</table>"
    if report.get("verdict"):
        out += f"<p class='verdict'><b>Verdict.</b> {e(report['verdict'])}</p>"
    return out + f"<p class='note'>{e(footnote(report))}</p>"
