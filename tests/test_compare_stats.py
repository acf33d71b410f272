"""Which approach wins and how sure we are (`eval/stats.py`), the table that shows it (`eval/table.py`),
the chart's label placement (`eval/report_chart.py`) and the report's worst answers: fast, no model,
on synthetic per-question tables whose answers are known."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from domainlm.eval import stats
from domainlm.eval.report_chart import _overlap, compare_chart, place_labels
from domainlm.eval.table import html_table, markdown_table


# ---- synthetic comparisons ----------------------------------------------------------------------

def _records(f1: list[float], em: list[float] | None = None, *, rag: bool = False, ids=None) -> list[dict]:
    em = em if em is not None else [float(x == 1.0) for x in f1]
    ids = ids or [f"q{i}" for i in range(len(f1))]
    out = []
    for i, (f, e) in enumerate(zip(f1, em)):
        r = {"id": ids[i], "question": f"question {i}", "gold": f"gold {i}", "answer": f"answer {i}",
             "exact_match": e, "f1": f, "contains": e}
        if rag:
            r.update(citation_correct=e, faithfulness=0.9, gold_retrieved=1.0,
                     sources=[{"n": 1, "doc_id": f"doc{i}", "source": "corpus.jsonl:1", "text": f"text of doc {i}"}])
        out.append(r)
    return out


def _row(recs: list[dict], *, p50: float, per_1k: float, train_s: float | None = None) -> dict:
    mean = lambda k: float(np.mean([r[k] for r in recs if r.get(k) is not None]))  # noqa: E731
    row = {"questions": len(recs), "exact_match": mean("exact_match"), "f1": mean("f1"), "contains": mean("contains"),
           "latency": {"p50_s": p50, "p95_s": p50 * 1.5, "n": 4}, "consistency": {"phrasings": 0.8, "seeds": 0.9},
           "cost": {"wall_s": 1.0, "cpu_s": 2.0, "cpu_s_per_1k_questions": per_1k},
           "training": None if train_s is None else {"train_seconds": train_s, "tokens": 12345, "steps": 30},
           "decontamination": {}}
    if "citation_correct" in recs[0]:
        row["citation_correct"] = mean("citation_correct")
        row["faithfulness"] = mean("faithfulness")
    return row


def _column(n: int, mean: float, seed: int) -> list[float]:
    """n F1 values in [0, 1] with about this mean (a third exact, the rest partial or zero)."""
    rng = random.Random(seed)
    return [1.0 if rng.random() < mean * 0.6 else round(min(1.0, max(0.0, rng.gauss(mean, 0.3))), 2) for _ in range(n)]


def synthetic(families: bool = True, n: int = 120) -> tuple[dict, dict]:
    """zero-shot == few-shot (same answers, same cost: their chart points coincide), rag, sft+rag a
    little better than rag on some questions (a tie), and scratch/sft+rag far below."""
    zero = _column(n, 0.15, 1)
    rng = random.Random(2)
    rag = [1.0 if rng.random() < 0.25 else round(rng.uniform(0.2, 0.7), 2) for _ in range(n)]
    # sft+rag: better on some questions, worse on others
    sft_rag = [round(v + 0.2, 2) if i % 2 == 0 and v < 1 else v for i, v in enumerate(rag)]
    sft_rag = [round(max(0.0, v - 0.25), 2) if i % 3 == 1 and v < 1 else v for i, v in enumerate(sft_rag)]
    records = {"zero-shot": _records(zero), "few-shot": _records(list(zero)), "rag": _records(rag, rag=True),
               "sft+rag": _records(sft_rag, rag=True)}
    rows = {"zero-shot": _row(records["zero-shot"], p50=0.3, per_1k=300.0),
            "few-shot": _row(records["few-shot"], p50=0.3, per_1k=300.0),
            "rag": _row(records["rag"], p50=0.4, per_1k=420.0),
            "sft+rag": _row(records["sft+rag"], p50=0.45, per_1k=450.0, train_s=360.0)}
    if families:
        records["scratch/sft+rag"] = _records(_column(n, 0.03, 3), rag=True)
        rows["scratch/sft+rag"] = _row(records["scratch/sft+rag"], p50=0.05, per_1k=40.0, train_s=1500.0)
    report = {"questions": n, "device": "cpu", "approaches": rows,
              "prompt_choice": {"template": "plain", "shots": 2, "dev_questions": 16, "library_version": 1}}
    return report, records


# ---- bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_of_a_constant_column_is_that_constant():
    assert stats.bootstrap_ci([1.0] * 50) == (1.0, 1.0, 1.0)
    assert stats.bootstrap_ci([1.0, None, 1.0, None]) == (1.0, 1.0, 1.0)     # None left out
    with pytest.raises(ValueError, match="no values"):
        stats.bootstrap_ci([None, None])


def test_bootstrap_of_a_fair_coin_matches_the_normal_interval():
    values = [1.0] * 200 + [0.0] * 200
    random.Random(7).shuffle(values)
    mean, lo, hi = stats.bootstrap_ci(values)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert mean == 0.5
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
    assert stats.bootstrap_ci(values, seed=3) == stats.bootstrap_ci(values, seed=3)   # seeded: reproducible
    assert stats.bootstrap_ci(values, seed=3) != stats.bootstrap_ci(values, seed=4)
    _, lo90, hi90 = stats.bootstrap_ci(values, confidence=0.90)
    assert lo < lo90 < hi90 < hi


def test_paired_bootstrap_of_identical_columns_is_a_tie_at_zero():
    a = _column(80, 0.4, 5)
    d = stats.paired_bootstrap(a, list(a))
    assert d["diff"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0 and stats.is_tie(d)


def test_paired_bootstrap_sees_a_difference_that_two_intervals_would_miss():
    rng = random.Random(11)
    b = [rng.choice([0.0, 0.25, 0.5]) for _ in range(80)]
    a = [v + 0.5 if i < 60 else v for i, v in enumerate(b)]          # better on 60 of 80, never worse
    d = stats.paired_bootstrap(a, b)
    assert d["diff"] == pytest.approx(0.375) and d["lo"] > 0 and not stats.is_tie(d) and d["p_le_0"] == 0.0
    # pairing by id: the same answer whatever order the files list the questions in
    ids = [f"q{i}" for i in range(80)]
    a_map = dict(zip(ids, a))
    b_map = dict(reversed(list(zip(ids, b))))
    assert stats.paired_bootstrap(a_map, b_map) == d


def test_paired_bootstrap_refuses_different_question_sets():
    with pytest.raises(ValueError, match="same questions on both sides: 1 only in the first, 1 only in the second"):
        stats.paired_bootstrap({"q1": 1.0, "q2": 0.0}, {"q1": 1.0, "q3": 0.0})
    with pytest.raises(ValueError, match="both sides must score the same questions"):
        stats.paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="occurs twice"):
        stats.by_id([{"id": "q1", "f1": 1.0}, {"id": "q1", "f1": 0.0}], "f1")
    report, records = synthetic(families=False)
    records["rag"] = records["rag"][:-1]
    with pytest.raises(ValueError, match="same questions"):
        stats.add_statistics(report, records)


# ---- add_statistics and the verdict -------------------------------------------------------------

def test_add_statistics_names_the_best_the_ties_and_is_deterministic():
    report, records = synthetic()
    stats.add_statistics(report, records)
    ap = report["approaches"]
    assert report["best"] == "sft+rag" and report["ties"] == ["rag"]
    assert "paired_vs_best" not in ap["sft+rag"]
    for name, r in ap.items():
        for m in ("exact_match", "f1", "contains"):
            lo, hi = r["intervals"][m]
            assert lo <= r[m] <= hi
        assert ("citation_correct" in r["intervals"]) == ("rag" in name)
        if name != "sft+rag":
            assert set(r["paired_vs_best"]) == {"f1", "exact_match"}
            assert r["paired_vs_best"]["f1"]["diff"] == pytest.approx(r["f1"] - ap["sft+rag"]["f1"])
    # identical answers: zero-shot and few-shot get identical intervals, and the run repeats exactly
    assert ap["zero-shot"]["intervals"] == ap["few-shot"]["intervals"]
    again, records2 = synthetic()
    stats.add_statistics(again, records2)
    assert json.dumps(again, sort_keys=True) == json.dumps(report, sort_keys=True)


def test_the_verdict_on_a_tie_says_tie_and_names_the_cheaper():
    report, records = synthetic(families=False)
    stats.add_statistics(report, records)
    v = report["verdict"]
    assert v.startswith("For this domain: sft+rag (F1 ")
    assert "sft+rag and rag tie on F1" in v and "choose the cheaper: rag, 0.4 s per question and no training" in v
    # the margin named is over the best runner-up that is not tied (zero-shot, before few-shot), with its interval
    d = report["approaches"]["zero-shot"]["paired_vs_best"]["f1"]
    assert f"{-d['diff']:.2f} F1 above zero-shot (95% interval {-d['hi']:.2f} to {-d['lo']:.2f})" in v
    assert "at 0.45 s per question and 6 min of training" in v
    assert "scratch" not in v and 1 <= v.count(". ") + 1 <= 3


def test_the_verdict_with_both_families_names_the_best_from_scratch():
    report, records = synthetic()
    stats.add_statistics(report, records)
    f1 = report["approaches"]["scratch/sft+rag"]["f1"]
    assert f"training from scratch at this size reaches F1 {f1:.2f} (scratch/sft+rag)" in report["verdict"]


def test_the_verdict_without_ties_and_without_latency_or_training():
    report, records = synthetic(families=False)
    for name in ("rag", "sft+rag"):
        del report["approaches"][name], records[name]
    report["approaches"]["few-shot"]["latency"] = {}
    records["few-shot"] = _records([min(1.0, v + 0.5) for v in (r["f1"] for r in records["zero-shot"])])
    report["approaches"]["few-shot"].update(f1=float(np.mean([r["f1"] for r in records["few-shot"]])))
    stats.add_statistics(report, records)
    v = report["verdict"]
    assert report["best"] == "few-shot" and report["ties"] == [] and "tie" not in v
    assert v.startswith("For this domain: few-shot (F1 ") and "F1 above zero-shot (95% interval" in v
    assert v.endswith(", with no training.") and "per question" not in v            # no latency: left out


def test_the_verdict_says_to_fix_retrieval_when_the_answer_is_missing_from_the_sources():
    report, records = synthetic(families=False)
    report["approaches"]["sft+rag"]["answer_in_sources"] = {
        "present": {"share": 0.37, "f1": 0.81, "exact_match": 0.6}, "absent": {"share": 0.63, "f1": 0.09}}
    stats.add_statistics(report, records)
    assert report["verdict"].endswith("The answer was in the sources for 37% of questions; F1 is 0.81 when it was "
                                      "and 0.09 when it was not: improve retrieval before training more.")
    report["approaches"]["sft+rag"]["answer_in_sources"]["absent"]["f1"] = 0.7     # small gap: no hint
    assert "retrieval" not in stats.verdict(report)


def test_record_file_names():
    assert stats.record_file("sft+rag") == "sft_rag.jsonl"
    assert stats.record_file("scratch/cpt+sft+rag") == "scratch__cpt_sft_rag.jsonl"
    assert stats.family("scratch/sft") == "scratch" and stats.family("cpt+sft+rag") == "base"


# ---- the table ----------------------------------------------------------------------------------

def test_markdown_table_shows_intervals_the_paired_difference_and_the_verdict():
    report, records = synthetic()
    stats.add_statistics(report, records)
    md = markdown_table(report)
    lines = md.splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line}
    r = report["approaches"]["rag"]
    lo, hi = r["intervals"]["f1"]
    assert f"| {r['f1']:.2f} [{lo:.2f}, {hi:.2f}] |" in rows["rag"]
    em_lo, em_hi = r["intervals"]["exact_match"]
    assert f"| {r['exact_match']:.2f} [{em_lo:.2f}, {em_hi:.2f}] |" in rows["rag"]
    assert "| best |" in rows["sft+rag"] and "| tie (" in rows["rag"]
    d = report["approaches"]["zero-shot"]["paired_vs_best"]["f1"]
    assert f"| {d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] |" in rows["zero-shot"] and d["hi"] < 0
    assert "| 6 min" not in md and "360 s, 12,345 tok" in rows["sft+rag"]          # existing columns kept
    # grouped by family, the base model's rows first; the verdict is the paragraph under the table
    names = [line.split(" | ")[0][2:] for line in lines if line.startswith("| ") and not line.startswith(("| approach",
                                                                                                          "| ---"))]
    assert names == ["**existing base model**", "zero-shot", "few-shot", "rag", "sft+rag", "**trained from scratch**",
                     "scratch/sft+rag"]
    assert report["verdict"] in lines
    assert all(line.count("|") == lines[0].count("|") for line in lines if line.startswith("| "))
    page = html_table(report)
    assert "<th colspan='14' class='group'>trained from scratch</th>" in page and html_table(report).count("<tr") == 8


def test_markdown_table_of_one_family_has_no_group_rows():
    report, records = synthetic(families=False)
    stats.add_statistics(report, records)
    md = markdown_table(report)
    assert "**" not in md and md.splitlines()[2].startswith("| zero-shot | ")


# ---- the chart ----------------------------------------------------------------------------------

def test_label_placement_keeps_labels_off_each_other_and_the_markers():
    points = [(100.0, 100.0), (100.0, 100.0), (100.0, 100.0), (104.0, 98.0), (300.0, 200.0)]
    sizes = [(60.0, 12.0), (55.0, 12.0), (80.0, 12.0), (40.0, 12.0), (50.0, 12.0)]
    boxes = place_labels(points, sizes, marker=6.0, bounds=(0.0, 0.0, 600.0, 400.0))
    markers = [(x - 6, y - 6, x + 6, y + 6) for x, y in points]
    for i, b in enumerate(boxes):
        assert b[2] - b[0] == pytest.approx(sizes[i][0]) and b[3] - b[1] == pytest.approx(sizes[i][1])
        assert all(_overlap(b, m) == 0 for m in markers)
        assert all(_overlap(b, o) == 0 for j, o in enumerate(boxes) if j != i)
        assert 0 <= b[0] and b[2] <= 600 and 0 <= b[1] and b[3] <= 400
    assert boxes[0][0] == pytest.approx(100 + 6 + 3)                     # the first takes the spot on the right


def test_compare_chart_labels_do_not_overlap_where_points_coincide(tmp_path):
    report, records = synthetic()
    stats.add_statistics(report, records)
    out = tmp_path / "compare.png"
    placed = compare_chart(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pts, labels = placed["points"], placed["labels"]
    assert pts["zero-shot"] == pts["few-shot"] and set(labels) == set(report["approaches"])
    m = placed["marker"]
    for name, box in labels.items():
        assert all(_overlap(box, (x - m, y - m, x + m, y + m)) == 0 for x, y in pts.values()), name
        assert all(_overlap(box, other) == 0 for n2, other in labels.items() if n2 != name), name


# ---- the report page ----------------------------------------------------------------------------

def test_report_page_shows_the_verdict_and_the_worst_answers_escaped(tmp_path):
    from domainlm import stages
    from domainlm.eval.report import render, worst

    report, records = synthetic(families=False)
    records["rag"][3].update(question="<script>alert(1)</script>?", f1=0.0, exact_match=0.0)
    records["rag"][3]["sources"][0]["text"] = "x" * 1000
    d = tmp_path / "run" / "compare"
    (d / "approaches").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stages.COMPARE}))
    (d / "compare.json").write_text(json.dumps(report))                   # written before the statistics existed
    for name, recs in records.items():
        (d / "approaches" / stats.record_file(name)).write_text("".join(json.dumps(r) + "\n" for r in recs))
    page_path = tmp_path / "report.html"
    render(tmp_path / "run", page_path)
    page = page_path.read_text()
    assert "<p class='verdict'><b>Verdict.</b> For this domain: sft+rag" in page and "tie (" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;?" in page
    assert "x" * 299 + "…" in page and "x" * 301 not in page                  # sources trimmed to 300 characters
    assert "doc3" in page and "none (this approach does not retrieve)" in page
    bad = worst(records["rag"])
    assert len(bad) == 5 and bad[0]["id"] == "q3"
    assert [(r["f1"], r["exact_match"]) for r in bad] == sorted((r["f1"], r["exact_match"]) for r in bad)
    assert all(r["exact_match"] < 1 for r in bad)


def test_report_refuses_a_foreign_output_file_and_names_a_damaged_manifest(tmp_path, capsys):
    """`report --output` that is a directory or a file the report did not write: one line, the file
    kept; an earlier page is replaced. A stage's manifest.json that is not a manifest is named."""
    from tests.conftest import run_cli

    run = tmp_path / "run"
    (run / "tok").mkdir(parents=True)
    (run / "tok" / "manifest.json").write_text(json.dumps({"stage": "tokenizer train"}))
    (run / ".tok.tmp-host-1").mkdir()                                 # an unfinished stage's hidden dir
    (run / ".tok.tmp-host-1" / "manifest.json").write_text("{")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out, needle in ((notes, "not an earlier output of this command"), (tmp_path, "is a directory")):
        code, _, err = run_cli(["report", "--run", run, "--output", out], capsys)
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert notes.read_text() == "keep me"
    page = tmp_path / "page.html"
    for _ in range(2):
        code, _, err = run_cli(["report", "--run", run, "--output", page], capsys)
        assert code == 0, err
    assert page.read_text().startswith("<!doctype html>")
    for text, needle in (("[1, 2]", "is not a domainlm manifest"), ("{oops", "is not valid JSON")):
        (run / "tok" / "manifest.json").write_text(text)
        code, _, err = run_cli(["report", "--run", run, "--output", page], capsys)
        assert code == 2 and needle in err and str(run / "tok" / "manifest.json") in err and "Traceback" not in err


def test_the_verdict_names_the_margin_over_a_component_as_alone():
    rag = _column(100, 0.3, 4)
    better = [min(1.0, v + 0.3) for v in rag]
    records = {"rag": _records(rag, rag=True), "sft+rag": _records(better, rag=True)}
    report = {"questions": 100, "device": "cpu", "approaches": {
        "rag": _row(records["rag"], p50=0.4, per_1k=400.0),
        "sft+rag": _row(records["sft+rag"], p50=1.9, per_1k=1900.0, train_s=6 * 60)}}
    stats.add_statistics(report, records)
    d = report["approaches"]["rag"]["paired_vs_best"]["f1"]
    assert report["ties"] == [] and d["hi"] < 0
    assert (f"{-d['diff']:.2f} F1 above rag alone (95% interval {-d['hi']:.2f} to {-d['lo']:.2f}), at 1.9 s per "
            "question and 6 min of training.") in report["verdict"]
