"""Which approach wins, by how much, and how sure we are: bootstrap intervals over questions, paired
differences against the best approach, and the verdict in words.

Everything resamples questions: an approach's score is a mean over the held-out questions, so its
uncertainty is that of the question sample. `bootstrap_ci` is the percentile bootstrap of one
approach's mean; `paired_bootstrap` resamples the same question indices for two approaches, so the
interval of their difference leaves out what the questions have in common (an easy question is
easy for both) and is much narrower than two separate intervals would suggest. Seeded: the same
table gives the same intervals.

`add_statistics` writes them into compare.json's report; `verdict` turns the report (and nothing
else) into 1-3 sentences. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("exact_match", "f1", "contains", "citation_correct", "faithfulness")
PAIRED = ("f1", "exact_match")
SCRATCH = "scratch"
"""The from-scratch family: approaches named `scratch/<approach>` (and the older bare `scratch`)."""
# The retrieval hint of the verdict: said when the answer was missing from the sources for at
# least this share of questions and F1 with it exceeds F1 without it by at least this much.
ABSENT_SHARE = 0.25
SOURCES_GAP = 0.25
_BLOCK = 1 << 22  # resampled values per block (bounded memory for long tables)


def record_file(name: str) -> str:
    """The per-question file of approach `name` under OUTPUT/approaches/: '+' -> '_', '/' -> '__'
    ('scratch/sft+rag' -> 'scratch__sft_rag.jsonl')."""
    return name.replace("+", "_").replace("/", "__") + ".jsonl"


def family(name: str) -> str:
    """'scratch' for a model trained from scratch (`scratch/...`), else 'base' (an existing base model)."""
    return SCRATCH if name == SCRATCH or name.startswith(SCRATCH + "/") else "base"


def _values(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None], dtype=np.float64)


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of n_boot resamples (with replacement) of x, drawn in blocks."""
    rng = np.random.default_rng(seed)
    n = len(x)
    rows = max(1, _BLOCK // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        out[start:start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    a = (1 - confidence) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float | None], *, n_boot: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over questions and its percentile-bootstrap interval (None values
    left out). Raises ValueError when no value is left."""
    x = _values(values)
    if not len(x):
        raise ValueError("bootstrap_ci: no values (all None or empty)")
    lo, hi = _interval(_boot_means(x, n_boot, seed), confidence)
    m = float(x.mean())
    return m, min(lo, m), max(hi, m)


def align(a: Mapping[str, float | None], b: Mapping[str, float | None]) -> tuple[list, list]:
    """Two {question id: value} maps as two lists in the same question order; the id sets must match."""
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a or only_b:
        ex = sorted(only_a)[:2] + sorted(only_b)[:2]
        raise ValueError(f"paired comparison needs the same questions on both sides: {len(only_a)} only in the "
                         f"first, {len(only_b)} only in the second (e.g. {', '.join(map(repr, ex))}); score both "
                         "approaches on the same test set")
    ids = list(a)
    return [a[i] for i in ids], [b[i] for i in ids]


def by_id(records: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float | None]:
    """{question id: the record's metric} of one approach's per-question records; refuses records
    without an id and repeated ids (pairing would be ambiguous)."""
    out: dict[str, float | None] = {}
    for n, r in enumerate(records):
        qid = r.get("id")
        if qid is None:
            raise ValueError(f"record {n} has no 'id': per-question records must carry the question's id to be paired")
        if qid in out:
            raise ValueError(f"question id {qid!r} occurs twice in one approach's records; ids must be unique")
        out[qid] = r.get(metric)
    return out


def paired_bootstrap(a: Sequence[float | None] | Mapping[str, float | None],
                     b: Sequence[float | None] | Mapping[str, float | None], *, n_boot: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """The mean of a - b over questions, its percentile-bootstrap interval resampling the same
    question indices for both, and p_le_0, the share of resamples with a difference <= 0 (small:
    a is better than b).

    a and b are either {question id: value} maps (aligned by id; different id sets are refused) or
    sequences already in the same question order (of equal length). A question where either side
    is None is left out."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise ValueError("paired_bootstrap: give both sides as {id: value} maps, or both as aligned sequences")
        a, b = align(a, b)
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} vs {len(b)} values; both sides must score the same questions")
    keep = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not keep:
        raise ValueError("paired_bootstrap: no question scored on both sides")
    d = np.asarray([float(x) - float(y) for x, y in keep], dtype=np.float64)
    means = _boot_means(d, n_boot, seed)
    lo, hi = _interval(means, confidence)
    m = float(d.mean())
    return {"diff": m, "lo": min(lo, m), "hi": max(hi, m), "p_le_0": float((means <= 0).mean()), "n": len(d)}


def is_tie(paired: Mapping[str, float]) -> bool:
    """The paired interval includes 0: no difference this test set can show."""
    return paired["lo"] <= 0.0 <= paired["hi"]


def add_statistics(report: dict[str, Any], records: Mapping[str, Sequence[Mapping[str, Any]]], *,
                   metrics: Sequence[str] = METRICS, seed: int = 0, n_boot: int = 2000,
                   confidence: float = 0.95) -> None:
    """Adds to report (compare.json's dict) in place: per approach `intervals` {metric: [lo, hi]} and,
    but for the best, `paired_vs_best` {"f1", "exact_match": paired_bootstrap(this, best)}; then
    `best` (by F1), `ties` (approaches whose paired F1 interval against the best includes 0),
    `confidence`, and `verdict`. records maps each approach to its per-question records."""
    approaches = report["approaches"]
    missing = [n for n in approaches if n not in records]
    if missing:
        raise ValueError(f"add_statistics: no per-question records for {', '.join(missing)}")
    for name, r in approaches.items():
        intervals = {}
        for m in metrics:
            vals = [x.get(m) for x in records[name]]
            if any(v is not None for v in vals):
                _, lo, hi = bootstrap_ci(vals, n_boot=n_boot, confidence=confidence, seed=seed)
                intervals[m] = [lo, hi]
        r["intervals"] = intervals
        r.pop("paired_vs_best", None)
    best = _best(approaches)
    report["best"] = best
    ties = []
    if best is not None:
        for name, r in approaches.items():
            if name == best:
                continue
            r["paired_vs_best"] = {m: paired_bootstrap(by_id(records[name], m), by_id(records[best], m),
                                                       n_boot=n_boot, confidence=confidence, seed=seed)
                                   for m in PAIRED}
            if is_tie(r["paired_vs_best"]["f1"]):
                ties.append(name)
    report["ties"] = ties
    report["confidence"] = confidence
    report["verdict"] = verdict(report)


def _best(approaches: Mapping[str, Mapping[str, Any]], names=None) -> str | None:
    """The approach with the highest mean F1 (then exact match, then the earlier one)."""
    names = [n for n in (approaches if names is None else names) if approaches[n].get("f1") is not None]
    if not names:
        return None
    order = list(approaches)
    return max(names, key=lambda n: (approaches[n]["f1"], approaches[n].get("exact_match") or 0.0, -order.index(n)))


# ---- the verdict --------------------------------------------------------------------------------

def _f(x: float) -> str:
    """Two decimals, never '-0.00'."""
    return f"{round(x, 2) + 0.0:.2f}"


def duration(seconds: float) -> str:
    """45 s, 6 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def trained(name: str) -> bool:
    """Whether the approach needs training: SFT or continued pretraining in its name, or from scratch."""
    approach = name.split("/", 1)[1] if family(name) == SCRATCH and "/" in name else name
    return family(name) == SCRATCH or any(p in ("sft", "cpt", "continued") for p in approach.split("+"))


def _training_s(name: str, r: Mapping[str, Any]) -> float | None:
    """Seconds of training: 0 for an approach that needs none, None when unknown."""
    t = r.get("training") or {}
    if t.get("train_seconds") is not None:
        return float(t["train_seconds"])
    return None if trained(name) else 0.0


def cost_phrase(name: str, r: Mapping[str, Any]) -> str:
    """'1.9 s per question and 6 min of training' (the parts that are known)."""
    parts = []
    p50 = (r.get("latency") or {}).get("p50_s")
    if p50 is not None:
        parts.append(f"{_secs(p50)} s per question")
    t = _training_s(name, r)
    if t is not None:
        parts.append("no training" if t == 0 and not trained(name) else f"{duration(t)} of training")
    return " and ".join(parts)


def per_1k(r: Mapping[str, Any]) -> float | None:
    """CPU- or GPU-seconds per 1,000 questions, as the cost dict records them."""
    cost = r.get("cost") or {}
    for unit in ("gpu_s_per_1k_questions", "cpu_s_per_1k_questions"):
        if cost.get(unit) is not None:
            return float(cost[unit])
    return None


def _cheapest(approaches: Mapping[str, Mapping[str, Any]], names: list[str]) -> str:
    """Training first (none beats some; unknown counts as the most), then cost per question."""
    def key(n: str):
        r = approaches[n]
        t = _training_s(n, r)
        q = per_1k(r)
        if q is None:
            q = (r.get("latency") or {}).get("p50_s")
        return (math.inf if t is None else t, math.inf if q is None else q, names.index(n))
    return min(names, key=key)


def _half_width(r: Mapping[str, Any], metric: str) -> float | None:
    iv = (r.get("intervals") or {}).get(metric)
    return None if not iv else (iv[1] - iv[0]) / 2


def _runner_name(runner: str, best: str) -> str:
    """'rag alone' when rag is a part of sft+rag."""
    parts = best.split("/")[-1].split("+")
    return f"{runner} alone" if family(runner) == family(best) and runner.split("/")[-1] in parts and \
        runner.split("/")[-1] != best.split("/")[-1] else runner


def verdict(report: Mapping[str, Any]) -> str:
    """Which approach to use, in 1-3 sentences, from the report's table alone (after add_statistics;
    without it, from the means)."""
    ap = report.get("approaches") or {}
    best = report.get("best") or _best(ap)
    if best is None:
        return "No approach was scored."
    r = ap[best]
    ties = [t for t in report.get("ties", []) if t in ap]
    pct = round(100 * report.get("confidence", 0.95))
    hw = _half_width(r, "f1")
    figures = f"F1 {r['f1']:.2f}" + (f" ± {hw:.2f}" if hw is not None else "")
    if r.get("exact_match") is not None:
        figures += f", exact match {r['exact_match']:.2f}"
    s1 = f"For this domain: {best} ({figures})"
    # the margin over the best runner-up that is not tied (of the best's own family, where it has one)
    others = [n for n in ap if n != best and n not in ties and ap[n].get("f1") is not None]
    same = [n for n in others if family(n) == family(best)]
    runner = _best(ap, same or others)
    if runner is not None:
        diff = (ap[runner].get("paired_vs_best") or {}).get("f1")
        if diff is not None:
            s1 += (f", {_f(-diff['diff'])} F1 above {_runner_name(runner, best)} ({pct}% interval "
                   f"{_f(-diff['hi'])} to {_f(-diff['lo'])})")
        else:
            s1 += f", {_f(r['f1'] - ap[runner]['f1'])} F1 above {_runner_name(runner, best)}"
    cost = cost_phrase(best, r)
    if cost:
        s1 += f", {'at' if 'per question' in cost else 'with'} {cost}"
    fams = {family(n) for n in ap}
    if len(fams) == 2:
        other = _best(ap, [n for n in ap if family(n) != family(best)])
        if other is not None:
            if family(other) == SCRATCH:
                s1 += f"; training from scratch at this size reaches F1 {ap[other]['f1']:.2f} ({other})"
            else:
                s1 += f"; the existing base model reaches F1 {ap[other]['f1']:.2f} at best ({other})"
    sentences = [s1 + "."]
    if ties:
        group = [best, *ties]
        names = ", ".join(group[:-1]) + " and " + group[-1]
        if len(ties) == 1:
            d = ap[ties[0]]["paired_vs_best"]["f1"]
            detail = (f"{r['f1']:.2f} vs {ap[ties[0]]['f1']:.2f}, difference {_f(-d['diff'])}, {pct}% interval "
                      f"{_f(-d['hi'])} to {_f(-d['lo'])}")
        else:
            detail = (f"{r['f1']:.2f} vs " + ", ".join(f"{ap[t]['f1']:.2f}" for t in ties)
                      + f", every difference's {pct}% interval includes 0")
        cheap = _cheapest(ap, group)
        cp = cost_phrase(cheap, ap[cheap])
        sentences.append(f"{names} tie on F1: {detail}; choose the cheaper: {cheap}" + (f", {cp}" if cp else "") + ".")
    hint = _sources_hint(ap, best)
    if hint:
        sentences.append(hint)
    return " ".join(sentences)


def _sources_hint(ap: Mapping[str, Mapping[str, Any]], best: str) -> str | None:
    """The retrieval hint, from the best approach's answer_in_sources split (else the best one that has it)."""
    with_split = [n for n in ap if (ap[n].get("answer_in_sources") or {}).get("present")
                  and (ap[n].get("answer_in_sources") or {}).get("absent")]
    if not with_split:
        return None
    name = best if best in with_split else _best(ap, with_split) or with_split[0]
    s = ap[name]["answer_in_sources"]
    present, absent = s["present"], s["absent"]
    share_p, share_a = present.get("share"), absent.get("share")
    if share_a is None and share_p is not None:
        share_a = 1 - share_p
    if share_p is None and share_a is not None:
        share_p = 1 - share_a
    f1_p, f1_a = present.get("f1"), absent.get("f1")
    if None in (share_p, share_a, f1_p, f1_a):
        return None
    if share_a >= ABSENT_SHARE and f1_p - f1_a >= SOURCES_GAP:
        who = "" if name == best else f" ({name})"
        return (f"The answer was in the sources for {100 * share_p:.0f}% of questions{who}; F1 is {f1_p:.2f} when it "
                f"was and {f1_a:.2f} when it was not: improve retrieval before training more.")
    return None
