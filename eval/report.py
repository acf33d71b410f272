"""`domainlm report RUN_DIR`: one HTML page for a pipeline run, with PNG charts.

Finds the stage outputs in RUN_DIR by their manifests and reads each through its stage's
contract: the tokenizer report, the shard drop counts, the pretraining and fine-tuning loss
curves, the comparison table (with intervals) and verdict, its chart, and each approach's worst
answers with the sources it was given (the per-question files, found by `stats.record_file`). A
stage that has not run is listed as missing.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.eval.report_chart import bars_chart, curves_chart
from domainlm.eval.stats import add_statistics, record_file
from domainlm.eval.table import html_table
from domainlm.manifest import MANIFEST, check_output_file
from domainlm.progress import summary


PAGE_START = "<!doctype html><meta charset='utf-8'><title>domainlm run "
"""How every page `report` writes starts: an existing --output file that does not is not replaced."""


def _stage_dirs(run: Path) -> dict[str, list[Path]]:
    """The run's stage outputs by stage; hidden dirs (a stage's unfinished `.NAME.tmp-*`) left out.
    A manifest that is not a JSON object is a damaged output: named, not skipped."""
    found: dict[str, list[Path]] = {}
    for d in sorted(p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = d / MANIFEST
        if m.is_file():
            try:
                data = json.loads(m.read_text(encoding="utf-8"))
            except ValueError as e:
                raise UserError(f"{str(m)!r} is not valid JSON ({e}); that stage's output is damaged: "
                                "run the stage again (or remove the directory) and then the report") from None
            if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
                raise UserError(f"{str(m)!r} is not a domainlm manifest (a JSON object with a 'stage'); that "
                                "output is damaged: run the stage again (or remove the directory) and then the report")
            found.setdefault(data["stage"], []).append(d)
    return found


def _curves(records: list[dict[str, Any]], kind: str, key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


FAILURES = 5
SOURCE_CHARS = 300


def _compare_records(d: Path) -> tuple[dict[str, Any] | None, dict[str, list[dict[str, Any]]]]:
    """compare.json's report and each approach's per-question records (those whose file exists)."""
    if not (d / "compare.json").is_file():
        return None, {}
    rep = json.loads((d / "compare.json").read_text(encoding="utf-8"))
    records = {}
    for name in rep.get("approaches", {}):
        f = d / "approaches" / record_file(name)
        if f.is_file():
            with open(f, encoding="utf-8") as fh:
                records[name] = [json.loads(line) for line in fh if line.strip()]
    return rep, records


def _compare_section(d: Path, rep: dict[str, Any] | None, records: dict[str, list[dict[str, Any]]]) -> str:
    """The table with intervals and the verdict (computed here for a compare.json written before them)."""
    if rep is None:
        table = (d / "compare.md").read_text(encoding="utf-8") if (d / "compare.md").is_file() else ""
        return f"<pre>{html.escape(table)}</pre>"
    if "verdict" not in rep and records and set(records) == set(rep.get("approaches", {})):
        add_statistics(rep, records)
    return html_table(rep)


def _trim(text: Any, n: int = SOURCE_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def worst(records: list[dict[str, Any]], n: int = FAILURES) -> list[dict[str, Any]]:
    """The n worst failures: answers that are not an exact match, lowest F1 first, then lowest exact match."""
    failed = [r for r in records if (r.get("exact_match") or 0.0) < 1.0]
    return sorted(failed, key=lambda r: (r.get("f1") or 0.0, r.get("exact_match") or 0.0))[:n]


def _failures_section(records: dict[str, list[dict[str, Any]]]) -> str:
    """Per approach, its worst answers: question, gold, the model's answer, and the sources it was given."""
    e = html.escape
    if not records:
        return ""
    parts = [f"<h3>Worst {FAILURES} answers per approach</h3>"]
    for name, recs in records.items():
        bad = worst(recs)
        rows = []
        for r in bad:
            if "sources" in r:
                src = "".join(f"<li><b>[{e(str(s.get('n', '')))}] {e(str(s.get('doc_id')))}</b>"
                              + (f" ({e(str(s['source']))})" if s.get("source") else "")
                              + (f": {e(_trim(s['text']))}" if s.get("text") is not None else "") + "</li>"
                              for s in r["sources"])
                src = f"<ol class='sources'>{src}</ol>" if src else "no source fitted the prompt"
            else:
                src = "none (this approach does not retrieve)"
            rows.append(f"<tr><td>{e(_trim(r.get('question'), 500))}</td><td>{e(_trim(r.get('gold'), 500))}</td>"
                        f"<td>{e(_trim(r.get('answer'), 500))}</td><td class=num>{(r.get('f1') or 0.0):.2f}</td>"
                        f"<td>{src}</td></tr>")
        body = "<p>every answer an exact match</p>"
        if rows:
            body = ("<table class='failures'><tr><th>question</th><th>gold answer</th><th>model's answer</th>"
                    "<th>F1</th><th>sources given</th></tr>" + "".join(rows) + "</table>")
        parts.append(f"<details><summary>{e(name)}: {len(bad)} of {len(recs)} shown</summary>{body}</details>")
    return "".join(parts)


def render(run: Path, out: Path) -> dict[str, Any]:
    from domainlm.data.shards import open_shards_dir
    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.pretrain.checkpoint import open_checkpoint_dir

    files = out.parent / (out.stem + "_files")
    if files.exists():
        shutil.rmtree(files)
    files.mkdir(parents=True)
    found = _stage_dirs(run)
    sections: list[str] = []
    shown: dict[str, Any] = {}

    def img(name: str) -> str:
        return f'<img src="{files.name}/{name}" alt="{html.escape(name)}">'

    tok_report = run / "tokenizer_report.json"
    if tok_report.is_file():
        rep = json.loads(tok_report.read_text(encoding="utf-8"))
        rows = [(r["tokenizer"], f"{r['bytes_per_token']} bytes/token, {r['tokens_per_word']} tokens/word, "
                                 f"byte fallback {r['byte_fallback_rate']}") for r in rep.get("results", [])]
        sections.append("<h2>Tokenizer</h2>" + _table(rows))
        shown["tokenizer"] = len(rows)
    for d in found.get(stages.DATA_SHARD, []):
        sd = open_shards_dir(d)
        dropped = {k: v for k, v in sd.manifest.get("dropped", {}).items() if v}
        counts = sd.manifest.get("counts", {})
        rows = [("records read", counts.get("records")), ("kept", counts.get("kept"))]
        rows += [(f"dropped: {k}", v) for k, v in dropped.items()]
        for split, info in sd.manifest.get("splits", {}).items():
            rows.append((f"{split}", f"{info.get('documents', 0):,} documents, {info.get('tokens', 0):,} tokens, "
                                     f"{len(info.get('shards', []))} shards"))
        chart = ""
        if dropped:
            bars_chart(dropped, files / f"{d.name}_dropped.png", title="documents dropped, by reason", xlabel="documents")
            chart = img(f"{d.name}_dropped.png")
        sections.append(f"<h2>Shards ({html.escape(d.name)})</h2>" + _table(rows) + chart)
        shown["shards"] = d.name
    for d in found.get(stages.PRETRAIN, []):
        recs = open_checkpoint_dir(d).metrics()
        curves_chart({"train loss": _curves(recs, "train", "loss"), "validation loss": _curves(recs, "eval", "val_loss")},
                     files / f"{d.name}_loss.png", title=f"pretraining ({d.name})", ylabel="loss")
        last = [r for r in recs if r.get("kind") == "eval"][-1:] or [{}]
        sections.append(f"<h2>Pretraining ({html.escape(d.name)})</h2>"
                        + _table([("steps logged", len(_curves(recs, "train", "loss"))),
                                  ("last validation perplexity", last[0].get("val_ppl"))])
                        + img(f"{d.name}_loss.png"))
        shown["pretrain"] = d.name
    for d in found.get(stages.FINETUNE_SFT, []):
        ad = open_adapter_dir(d)
        recs = ad.metrics()
        curves_chart({"train loss": _curves(recs, "train", "loss"), "validation loss": _curves(recs, "eval", "val_loss")},
                     files / f"{d.name}_loss.png", title=f"fine-tuning ({d.name})", ylabel="loss")
        sections.append(f"<h2>Fine-tuning ({html.escape(d.name)}, {html.escape(ad.method)})</h2>"
                        + img(f"{d.name}_loss.png"))
        shown.setdefault("finetune", []).append(d.name)
    for d in found.get(stages.FINETUNE_DPO, []):
        ad = open_adapter_dir(d)
        recs = ad.metrics()
        curves_chart({"train loss": _curves(recs, "train", "loss"), "reward margin": _curves(recs, "train", "margin"),
                      "reward accuracy": _curves(recs, "train", "accuracy")},
                     files / f"{d.name}_dpo.png", title=f"preference tuning ({d.name})", ylabel="loss / margin / accuracy")
        checks = ad.manifest.get("checks") or {}
        before, after = (checks.get("before") or {}).get("pairs") or {}, (checks.get("after") or {}).get("pairs") or {}
        rows = [(f"held-out pairs: {k}", f"{before[k]:.3f} -> {after[k]:.3f}")
                for k in ("loss", "margin", "accuracy", "logp_margin") if k in before and k in after]
        sections.append(f"<h2>Preference tuning ({html.escape(d.name)}, DPO)</h2>" + _table(rows)
                        + img(f"{d.name}_dpo.png"))
        shown.setdefault("finetune", []).append(d.name)
    for d in found.get(stages.COMPARE, []):
        chart = ""
        if (d / "compare.png").is_file():
            shutil.copy(d / "compare.png", files / f"{d.name}_compare.png")
            chart = img(f"{d.name}_compare.png")
        rep, records = _compare_records(d)
        sections.append(f"<h2>Which approach ({html.escape(d.name)})</h2>" + _compare_section(d, rep, records) + chart
                        + _failures_section(records))
        shown["compare"] = d.name
    missing = [s for s in ("tokenizer", "shards", "pretrain", "finetune", "compare") if s not in shown]
    if missing:
        sections.append("<h2>Not in this run</h2><p>" + ", ".join(missing) + "</p>")
    page = (PAGE_START + html.escape(str(run)) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%;margin:1em 0}"
            "pre{overflow-x:auto;font-size:12px}td.num{text-align:right}th.group{background:#f3f3f3}"
            "tr.best td{font-weight:bold}table.compare{font-size:13px}table.failures{font-size:12px}"
            "table.failures td{vertical-align:top}ol.sources{margin:0;padding-left:1.2em}</style>"
            f"<h1>domainlm run {html.escape(str(run))}</h1>" + "".join(sections))
    out.write_text(page, encoding="utf-8")
    return {"sections": shown, "missing": missing, "charts": sorted(p.name for p in files.iterdir())}


def report(cfg) -> int:
    run = Path(cfg.run)
    if not run.is_dir():
        raise UserError(f"run {cfg.run!r} is not a directory; give a pipeline's workdir (e.g. runs/demo)")
    out = check_output_file(cfg.output or run / "report.html", ours=lambda text: text.startswith(PAGE_START))
    info = render(run, out)
    summary("report", [("page", str(out)), ("sections", ", ".join(info["sections"]) or "none"),
                       ("charts", len(info["charts"])), ("not in this run", ", ".join(info["missing"]) or "-")])
    return 0
