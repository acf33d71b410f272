"""`domainlm compare`: every approach the config can build answers the same held-out questions.

Two families of models, each with the same approaches:
    (no prefix)  an existing base model (a GGUF or HF dir the user brings, e.g. SmolLM2-135M)
    scratch/     the model pretrained from scratch on the domain

    zero-shot    the base model, the prompt template picked on the dev split
    few-shot     the same with k worked examples from the train data (k picked on the dev split)
    rag          the base model with the index's sources in the prompt
    sft          the SFT adapter (trained on the QA train split), the question as it was trained
    sft+rag      the SFT+RAG adapter (trained on prompts with retrieved sources) with retrieval
    sft+dpo      the SFT adapter after DPO on pairs from its own wrong answers (eval pairs, finetune dpo)
    sft+rag+dpo  the SFT+RAG adapter after DPO on its own wrong answers to RAG prompts, with retrieval
    cpt+sft+rag  the base continued on the domain shards, then its SFT+RAG adapter, with retrieval

Per approach: exact match, token F1, contains (and for RAG: gold retrieved, citation correct,
faithfulness), each with a 95% bootstrap interval and a paired bootstrap against the best
(`eval/stats.py`), consistency (agreement across three phrasings of the prompt, and across
sampling seeds), latency p50/p95 answering one question at a time, cost in CPU- or GPU-seconds per
1,000 questions, and for the trained approaches the training cost. Plus decontamination: 13-gram
overlap of the test items with each approach's training sources (and, for RAG, with the index,
which holds the gold documents by design), a hard check that no test question is in the SFT
data, and a verdict in words.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.eval import metrics
from domainlm.eval.command import device_of, library_path
from domainlm.eval.config import CompareConfig, Inputs, decoding
from domainlm.eval.prompts import PromptLibrary, load_library
from domainlm.eval.qa import Approach, answer_and_score, build_prompts, latency, summarize
from domainlm.eval.stats import add_statistics, record_file
from domainlm.eval.table import markdown_table
from domainlm.manifest import (MANIFEST, StageOutput, describe_inputs, library_versions, make_manifest, recorded_config,
                               sha256_json, write_json)
from domainlm.progress import log, summary
from domainlm.qa import QA, read_qa, refuse_test_split, refuse_train_split, sample, split_spec

NEEDS = {"zero-shot": ("model",), "few-shot": ("model",), "rag": ("model", "index"), "sft": ("model", "sft"),
         "sft+rag": ("model", "sft_rag", "index"), "cpt+sft+rag": ("cpt_model", "cpt_sft_rag", "index"),
         "sft+dpo": ("model", "sft_dpo"), "sft+rag+dpo": ("model", "sft_rag_dpo", "index")}
BUILT_BY = {"model": "convert from-gguf or convert to-hf (stage `base` or `convert`)", "index": "index build (stage `index`)",
            "sft": "finetune sft (stage `finetune`)", "sft_rag": "finetune sft on eval rag-data (stage `finetune_rag`)",
            "cpt_model": "convert from-hf + pretrain --init-from + convert to-hf (stages `cpt_*`)",
            "cpt_sft_rag": "finetune sft of the CPT model on eval rag-data (stage `cpt_finetune_rag`)",
            "sft_dpo": "eval pairs + finetune dpo of the SFT adapter (stages `base_pairs`, `base_dpo`)",
            "sft_rag_dpo": "eval pairs --index + finetune dpo of the SFT+RAG adapter"}
PHRASINGS = 3


def family_of(name: str) -> tuple[str, str]:
    """'scratch/sft+rag' -> ('scratch', 'sft+rag'); 'rag' -> ('', 'rag')."""
    fam, _, approach = name.rpartition("/")
    return fam, approach


def _check_budget(cfg: CompareConfig, families: list[str]) -> None:
    """The sources budget must fit the context of at least one family's model with RAG rows; a
    family whose context is shorter gets what its context leaves (as its SFT+RAG data did)."""
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from domainlm.serve.prompt import check_budget

    contexts = {}
    for fam in families:
        rag_rows = [a for a in cfg.approaches if family_of(a)[0] == fam and family_of(a)[1] != "sft"
                    and "rag" in family_of(a)[1]]
        model = family_inputs(cfg, fam).model
        if rag_rows and model:
            contexts[fam or "inputs"] = open_hf_dir(model).max_positions or 2048
    if contexts:
        fam, ctx = max(contexts.items(), key=lambda kv: kv[1])
        check_budget(cfg.rag.max_source_tokens, ctx, "rag.max_source_tokens")
        for f, c in contexts.items():
            if cfg.rag.max_source_tokens >= c:
                log.info("compare: the %s family's context is %d tokens: its sources take what the context leaves "
                         "(rag.max_source_tokens %d)", f, c, cfg.rag.max_source_tokens)


def family_inputs(cfg: CompareConfig, fam: str) -> Inputs:
    """The inputs of a family; the scratch family shares the base's index when it names none."""
    if not fam:
        return cfg.inputs
    from dataclasses import replace

    return replace(cfg.scratch, index=cfg.scratch.index or cfg.inputs.index)


def inputs(cfg: CompareConfig) -> list[dict]:
    paths = []
    for i in (cfg.inputs, cfg.scratch):
        paths += [i.model, i.index, i.sft, i.sft_rag, i.cpt_model, i.cpt_sft_rag, i.sft_dpo, i.sft_rag_dpo]
    paths += [*cfg.qa.train, *cfg.qa.test, library_path(cfg.prompt.library)]
    return describe_inputs(sorted({Path(split_spec(p)[0]) for p in paths if p}))


def check_inputs(cfg: CompareConfig) -> None:
    """Every input of every approach is there, and every adapter is for its base model: refused
    before the first approach answers, not after."""
    for a in cfg.approaches:
        fam, approach = family_of(a)
        section = f"{fam or 'inputs'}"
        for need in NEEDS[approach]:
            path = getattr(family_inputs(cfg, fam), need)
            if not path:
                raise UserError(f"approach {a!r} needs {section}.{need}, built by {BUILT_BY[need]}; set it, or drop "
                                f"{a!r} from approaches")
            if not Path(path).is_dir():
                raise UserError(f"approach {a!r}: {section}.{need} {path!r} does not exist yet; it is built by "
                                f"{BUILT_BY[need]}")
    if not cfg.qa.test or not cfg.qa.train:
        raise UserError("qa.train and qa.test: give the QA train and test files (e.g. qa.jsonl:train, qa.jsonl:test)")
    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    models: dict[str, Any] = {}
    for a in cfg.approaches:
        fin = family_inputs(cfg, family_of(a)[0])
        model, *rest = NEEDS[family_of(a)[1]]
        path = getattr(fin, model)
        if path not in models:
            models[path] = open_hf_dir(path)
            models[path].require_chat_template("evaluation")
        for need in rest:
            if need != "index":
                open_adapter_dir(getattr(fin, need)).check_base(models[path])


def _duplicate_questions(test: list[QA]) -> int:
    """Test questions asked again (same words after SQuAD's normalisation): each is scored again, so
    they weigh twice; warned about and counted in compare.json."""
    seen: dict[str, QA] = {}
    dups = []
    for qa in test:
        key = metrics.normalize(qa.question)
        if key in seen:
            dups.append((qa, seen[key]))
        else:
            seen[key] = qa
    if dups:
        qa, first = dups[0]
        log.warning("%d test question(s) repeat an earlier one and are scored again (they weigh twice), e.g. %r "
                    "(%s, first %s); remove the repeats from the test file for an even weighting", len(dups),
                    qa.question[:80], qa.id, first.id)
    return len(dups)


def split_dev(train: list[QA], n: int, seed: int) -> tuple[list[QA], list[QA]]:
    """A dev set of n questions carved from train by document (no document on both sides), and the rest."""
    docs = sorted({qa.doc_id or qa.id for qa in train})
    random.Random(seed).shuffle(docs)
    dev_docs, dev = set(), []
    for d in docs:
        if len(dev) >= n:
            break
        dev_docs.add(d)
        dev.extend(qa for qa in train if (qa.doc_id or qa.id) == d)
    dev = dev[:n]
    dev_docs = {qa.doc_id or qa.id for qa in dev}
    return dev, [qa for qa in train if (qa.doc_id or qa.id) not in dev_docs]


def pick_prompt(gen, library: PromptLibrary, dev: list[QA], pool: list[QA], cfg: CompareConfig) -> dict[str, Any]:
    """The template (zero-shot) and the number of shots (few-shot) that score best on dev."""
    scores: dict[str, dict] = {}
    for name in library.templates:
        recs, _ = answer_and_score(gen, dev, Approach("zero-shot", name), library, seed=cfg.qa.seed,
                                   **decoding(cfg.gen))
        scores[name] = summarize(recs)
    best = max(scores, key=lambda t: (scores[t]["exact_match"], scores[t]["f1"], -list(library.templates).index(t)))
    shot_scores: dict[int, dict] = {}
    for k in library.shots or [cfg.prompt.shots]:
        recs, _ = answer_and_score(gen, dev, Approach("few-shot", best, shots=k), library, pool=pool,
                                   seed=cfg.qa.seed, **decoding(cfg.gen))
        shot_scores[k] = summarize(recs)
    best_k = max(shot_scores, key=lambda k: (shot_scores[k]["exact_match"], shot_scores[k]["f1"], -k))
    return {"template": best, "shots": best_k, "dev_questions": len(dev), "library_version": library.version,
            "templates": {t: {"exact_match": s["exact_match"], "f1": s["f1"]} for t, s in scores.items()},
            "shots_scores": {k: {"exact_match": s["exact_match"], "f1": s["f1"]} for k, s in shot_scores.items()}}


def consistency(gen, items: list[QA], approach: Approach, library: PromptLibrary, cfg: CompareConfig, *,
                pool: list[QA], retriever) -> dict[str, float]:
    """Agreement of the answers across PHRASINGS templates (greedy) and across sampling seeds."""
    templates = [approach.template] + [t for t in library.templates if t != approach.template][: PHRASINGS - 1]
    by_template = []
    for t in templates:
        a = Approach(approach.mode, t, approach.shots, approach.top_k, approach.retrieval_mode,
                     approach.max_source_tokens)
        prompts, _ = build_prompts(items, a, library, pool=pool, retriever=retriever, seed=cfg.qa.seed, tok=gen.tok,
                                   room=gen.room(cfg.gen.max_new_tokens))
        by_template.append([g.text for g in gen.generate(prompts, max_new_tokens=cfg.gen.max_new_tokens,
                                                          batch_size=cfg.gen.batch_size)])
    prompts, _ = build_prompts(items, approach, library, pool=pool, retriever=retriever, seed=cfg.qa.seed, tok=gen.tok,
                               room=gen.room(cfg.gen.max_new_tokens))
    by_seed = [[g.text for g in gen.generate(prompts, max_new_tokens=cfg.gen.max_new_tokens, batch_size=cfg.gen.batch_size,
                                             temperature=0.7, top_p=0.95, seed=s)]
               for s in range(cfg.consistency_seeds)]
    return {"phrasings": metrics.mean(metrics.agreement([m[i] for m in by_template]) for i in range(len(items))),
            "seeds": metrics.mean(metrics.agreement([m[i] for m in by_seed]) for i in range(len(items))),
            "phrasing_templates": templates}


def training_cost(adapter_dir: str | None, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Seconds and tokens the adapter's training took, as its manifest (read here unless given) records them."""
    if manifest is None:
        if not adapter_dir or not (Path(adapter_dir) / MANIFEST).is_file():
            return None
        manifest = json.loads((Path(adapter_dir) / MANIFEST).read_text(encoding="utf-8"))
    t = manifest.get("training") or {}
    if "seconds" not in t:
        return None
    return {"train_seconds": t["seconds"], "tokens": t.get("tokens"), "steps": t.get("steps"),
            "device": t.get("device"), "resumed_at": t.get("resumed_at")}


class Partial:
    """What an interrupted `compare` finished, kept beside the output (`.NAME.partial/`): each
    family's prompt choice and each approach's answers and measurements, written as each is done.
    A rerun whose key matches (the recorded config but for the list of approaches, the inputs'
    checksums, the prompt library, device, dtype and versions) reuses them and answers only the
    rest; another key starts afresh. Removed once the output is written."""

    def __init__(self, output: str, key: str):
        out = Path(output)
        self.dir = out.parent / f".{out.name}.partial"
        self.reused: list[str] = []
        if self.dir.is_dir():
            try:
                same = json.loads((self.dir / "state.json").read_text(encoding="utf-8")).get("key") == key
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "state.json", {"key": key})

    def _file(self, name: str) -> Path:
        return self.dir / record_file(name).replace(".jsonl", ".json")

    def load(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._file(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, name: str, obj: dict[str, Any]) -> None:
        f = self._file(name)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
        tmp.rename(f)                                   # whole or absent

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def partial_key(cfg: CompareConfig, described: list[dict], device: str, dtype) -> str:
    """What decides an approach's answers and measurements (see Partial); `described`: inputs(cfg)."""
    config = recorded_config(cfg)
    config.pop("approaches", None)
    return sha256_json({"stage": stages.COMPARE, "config": config, "inputs": described, "device": device,
                        "dtype": str(dtype), "versions": library_versions()})


def run(cfg: CompareConfig) -> int:
    from domainlm.eval.decontam import build_index, contaminated, summary as decontam_summary
    from domainlm.eval.generate import Generator, cpu_threads, torch_dtype
    from domainlm.eval.report_chart import compare_chart

    library = load_library(library_path(cfg.prompt.library), cfg.prompt.domain)
    library.template(cfg.prompt.template)
    if cfg.pipeline:
        from domainlm.pipeline import run_pipeline

        log.info("building what the approaches need: domainlm run %s (its compare/report stages left out)", cfg.pipeline)
        run_pipeline(cfg.pipeline, skip_commands=(stages.COMPARE, stages.REPORT))
    check_inputs(cfg)
    test = read_qa(cfg.qa.test)
    refuse_train_split(test, "qa.test")
    test = sample(test, cfg.qa.limit, cfg.qa.seed)
    train = read_qa(cfg.qa.train)
    refuse_test_split(train, "qa.train", "the dev questions and few-shot examples", cfg.qa.train)
    leaked = _test_questions_in_training(test, train, cfg)
    if leaked:
        raise UserError(f"{len(leaked)} test question(s) are in the training data, e.g. {leaked[0]!r}; the QA split "
                        "must keep every test question out of SFT (split by document/symbol)")
    dev, pool = split_dev(train, cfg.qa.dev, cfg.qa.seed)
    shots = max(library.shots or [cfg.prompt.shots])
    few_shot = any(family_of(a)[1] == "few-shot" for a in cfg.approaches)
    if few_shot and len(pool) < shots:  # a small QA set: a smaller dev split rather than no few-shot
        for n in range(min(cfg.qa.dev, len(train)) - 1, 0, -1):
            smaller, rest = split_dev(train, n, cfg.qa.seed)
            if len(rest) >= shots:
                log.warning("qa.train holds %d questions: the dev split (qa.dev %d, whole documents) would leave "
                            "%d few-shot examples for up to %d shots, so it takes %d questions (the prompt choice "
                            "rests on fewer); give more training questions for a %d-question dev split",
                            len(train), cfg.qa.dev, len(pool), shots, len(smaller), cfg.qa.dev)
                dev, pool = smaller, rest
                break
    if few_shot and len(pool) < shots:
        raise UserError(f"qa.train ({', '.join(cfg.qa.train)}): {len(train)} questions, of which the dev split "
                        f"(qa.dev {cfg.qa.dev}, whole documents) takes {len(dev)}, leaves {len(pool)} few-shot "
                        f"examples for up to {shots} shots; give more training questions, lower --qa.dev, or leave "
                        "few-shot out of --approaches")
    duplicates = _duplicate_questions(test)
    device = device_of(cfg.gen.device)
    retriever, unknown = None, []
    if any("rag" in family_of(a)[1] for a in cfg.approaches):
        from domainlm.eval.retrieval import known_documents, with_index_ids
        from domainlm.serve.retrieve import open_retriever

        index = cfg.inputs.index or cfg.scratch.index
        retriever = open_retriever(index, device=device)
        test = with_index_ids(test, retriever)
        pool = with_index_ids(pool, retriever, say=False)   # few-shot examples avoid the question's document
        _, unknown = known_documents(test, retriever, cfg.qa.test, index,
                                     fate="scored (retrieving or citing their gold document counts as a miss)")
    families = list(dict.fromkeys(family_of(a)[0] for a in cfg.approaches))
    if retriever is not None:
        _check_budget(cfg, families)
    dtype = torch_dtype(cfg.gen.dtype, device)
    with StageOutput(cfg.output, stages.COMPARE, overwrite=cfg.overwrite) as out, \
            cpu_threads(cfg.gen.threads if device == "cpu" else 0):
        described = inputs(cfg)
        partial = Partial(cfg.output, partial_key(cfg, described, device, dtype))
        (out.tmp / "approaches").mkdir()
        results: dict[str, dict[str, Any]] = {}
        records: dict[str, list[dict[str, Any]]] = {}
        choices: dict[str, dict[str, Any]] = {}
        decontam: dict[str, Any] = {}
        sources: dict[str, Any] = {}
        budgets: dict[str, dict[str, Any]] = {}
        for fam in families:
            fin = family_inputs(cfg, fam)
            names = [a for a in cfg.approaches if family_of(a)[0] == fam]
            fcfg = cfg
            if fin.model:
                fcfg, budgets[fam or "base"] = _answer_budget(cfg, fam, fin.model, train)
            done = {n: partial.load(n) for n in names}
            choice = partial.load(f"{fam}/prompt-choice")
            base = None
            if fin.model and (choice is None or any(done[n] is None and family_of(n)[1] in BASE_ROWS for n in names)):
                base = Generator(fin.model, device=device, dtype=dtype)
            if choice is None:
                choice = pick_prompt(base, library, dev, pool, fcfg) if base is not None else \
                    {"template": cfg.prompt.template, "shots": cfg.prompt.shots}
                partial.save(f"{fam}/prompt-choice", choice)
            choices[fam or "base"] = choice
            log.info("%sprompt picked on %d dev questions: template %r, %d shots", f"{fam}: " if fam else "", len(dev),
                     choice["template"], choice["shots"])
            found = _decontamination(test, fin, names, build_index, contaminated, decontam_summary)
            sources[fam or "base"] = found.pop("_sources")
            decontam.update(found)
            for name in names:
                if done[name] is not None:
                    log.info("approach %s: %d questions, answered by an interrupted run (%s)", name, len(test),
                             partial.dir)
                    partial.reused.append(name)
                    recs, measured = done[name]["records"], done[name]["measured"]
                else:
                    log.info("approach %s: %d questions", name, len(test))
                    recs, measured = _answer(name, fin, choice, base, device, dtype, test, library, pool, retriever,
                                             fcfg)
                    partial.save(name, {"records": recs, "measured": measured})
                records[name] = recs
                with open(out.tmp / "approaches" / record_file(name), "w", encoding="utf-8") as f:
                    for r in recs:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
                results[name] = {**summarize(recs), **measured, "training": _training(family_of(name)[1], fin),
                                 "decontamination": decontam.get(name)}
        report = {"questions": len(test), "duplicate_questions": duplicates, "doc_id_not_in_index": len(unknown),
                  "resumed": partial.reused, "answer_budget": budgets, "device": device, "dtype": str(dtype).removeprefix("torch."),
                  "prompt_choice": choices.get("base") or choices[families[0]], "prompt_choices": choices,
                  "approaches": results, "decontamination_sources": sources}
        add_statistics(report, records, seed=cfg.qa.seed)
        write_json(out.tmp / "compare.json", report)
        table = markdown_table(report)
        (out.tmp / "compare.md").write_text(table, encoding="utf-8")
        compare_chart(report, out.tmp / "compare.png")
        out.commit(make_manifest(stages.COMPARE, cfg, described, summary={
            k: {"exact_match": v["exact_match"], "f1": v["f1"]} for k, v in results.items()}))
    partial.remove()
    print(table)
    best = report["best"]
    cut = ", ".join(f"{n} {r['truncated']}" for n, r in results.items() if r.get("truncated"))
    summary("compare", [("questions", len(test)), ("best by F1", f"{best} ({results[best]['f1']:.3f})"),
                        ("verdict", report["verdict"])]
            + ([("prompts cut to fit the context", f"{cut} (kept their end)")] if cut else [])
            + ([("duplicate test questions", f"{duplicates} (each scored again)")] if duplicates else [])
            + ([("test doc_id not in the index", f"{len(unknown)} (retrieval and citation scored as misses)")]
               if unknown else [])
            + [("answer budget", "; ".join(f"{fam}: {_budget_words(b)}" for fam, b in budgets.items()))]
            + ([("resumed", f"{len(partial.reused)} of {len(results)} approaches answered by an interrupted run "
                            f"({', '.join(partial.reused)}); their latency and cost are that run's")]
               if partial.reused else [])
            + [("table", str(Path(cfg.output) / "compare.md")), ("chart", str(Path(cfg.output) / "compare.png"))])
    return 0


def _answer_budget(cfg: CompareConfig, fam: str, model: str, train: list[QA]) -> tuple[CompareConfig, dict[str, Any]]:
    """The family's answer budget (gen.max_new_tokens, or with 0 from the QA train answers in its
    model's tokens) and the config that decodes with it; warned about when it cuts more than 10%
    of the train answers."""
    from dataclasses import replace

    from domainlm.eval.generate import answer_budget
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    hf = open_hf_dir(model)
    b = answer_budget(hf.tokenizer(), [qa.answer for qa in train], hf.max_positions or 2048, cfg.gen.max_new_tokens)
    label = f"{fam} family" if fam else "existing base"
    if b["auto"]:
        log.info("compare: the %s answers in up to %d tokens (gen.max_new_tokens 0: its QA train answers' 99th "
                 "percentile is %d tokens)", label, b["max_new_tokens"], b["p99_tokens"])
    elif b["longer_than_budget"] > 0.1 * b["train_answers"]:
        log.warning("compare: gen.max_new_tokens %d leaves %d of the %d QA train answers no room (the %s's tokens; "
                    "99th percentile %d): answers that long are cut and score lower; raise it, or set 0 to take it "
                    "from the train answers", b["max_new_tokens"], b["longer_than_budget"], b["train_answers"], label,
                    b["p99_tokens"])
    return (replace(cfg, gen=replace(cfg.gen, max_new_tokens=b["max_new_tokens"])) if b["auto"] else cfg), b


def _budget_words(b: dict[str, Any]) -> str:
    how = "from the train answers" if b["auto"] else "gen.max_new_tokens"
    return (f"{b['max_new_tokens']} tokens ({how}; train answers p99 {b['p99_tokens']}, "
            f"{b['longer_than_budget']:,} of {b['train_answers']:,} longer)")


BASE_ROWS = ("zero-shot", "few-shot", "rag")
"""Approaches the family's base model answers itself (the others load their adapter)."""


def _answer(name: str, fin: Inputs, choice: dict, base, device: str, dtype, test: list[QA], library: PromptLibrary,
            pool: list[QA], retriever, cfg: CompareConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One approach's scored answers to the test questions, and what was measured of it: prompt,
    latency, consistency, cost."""
    gen, approach = _approach(family_of(name)[1], fin, choice, base, device, cfg.rag, dtype)
    recs, cost = answer_and_score(gen, test, approach, library, pool=pool, retriever=retriever,
                                  seed=cfg.qa.seed, **decoding(cfg.gen))
    lat = latency(gen, test[: cfg.latency_questions], approach, library, pool=pool, retriever=retriever,
                  max_new_tokens=cfg.gen.max_new_tokens, temperature=cfg.gen.temperature, top_p=cfg.gen.top_p)
    cons = consistency(gen, test[: cfg.consistency_questions], approach, library, cfg, pool=pool,
                       retriever=retriever) if cfg.consistency_questions else {}
    unit = "gpu_s" if device == "cuda" else "cpu_s"
    per_1k = (cost["wall_s"] if device == "cuda" else cost["cpu_s"]) * 1000 / max(1, len(test))
    return recs, {"template": approach.template, "shots": approach.shots, "latency": lat, "consistency": cons,
                  "cost": {**cost, f"{unit}_per_1k_questions": per_1k}}


def _approach(approach: str, fin: Inputs, choice: dict, base, device: str, rag_args, dtype):
    from domainlm.eval.generate import Generator

    rag = dict(top_k=rag_args.top_k, retrieval_mode=rag_args.mode, max_source_tokens=rag_args.max_source_tokens)
    if approach == "zero-shot":
        return base, Approach("zero-shot", choice["template"])
    if approach == "few-shot":
        return base, Approach("few-shot", choice["template"], shots=choice["shots"])
    if approach == "rag":
        return base, Approach("rag", choice["template"], **rag)
    if approach == "sft":
        return Generator(fin.model, fin.sft, device=device, dtype=dtype), Approach("zero-shot", "plain")
    if approach == "sft+rag":
        return Generator(fin.model, fin.sft_rag, device=device, dtype=dtype), Approach("rag", "plain", **rag)
    if approach == "cpt+sft+rag":
        return Generator(fin.cpt_model, fin.cpt_sft_rag, device=device, dtype=dtype), Approach("rag", "plain", **rag)
    if approach == "sft+dpo":
        return Generator(fin.model, fin.sft_dpo, device=device, dtype=dtype), Approach("zero-shot", "plain")
    if approach == "sft+rag+dpo":
        return Generator(fin.model, fin.sft_rag_dpo, device=device, dtype=dtype), Approach("rag", "plain", **rag)
    raise AssertionError(approach)


def _training(approach: str, fin: Inputs) -> dict[str, Any] | None:
    if approach.endswith("+dpo"):
        return preference_cost(fin.sft_dpo if approach == "sft+dpo" else fin.sft_rag_dpo)
    cost = training_cost({"sft": fin.sft, "sft+rag": fin.sft_rag, "cpt+sft+rag": fin.cpt_sft_rag}.get(approach))
    if approach == "cpt+sft+rag" and cost is not None:
        cpt = pretraining_cost(fin.cpt_model)
        if cpt is None:          # the CPT run's time is unknown: the row's training time is too
            return {**cost, "train_seconds": None, "adapter_seconds": cost["train_seconds"]}
        cost = {**cost, "adapter_seconds": cost["train_seconds"], "cpt_seconds": cpt["seconds"],
                "train_seconds": cost["train_seconds"] + cpt["seconds"],
                "tokens": (cost.get("tokens") or 0) + cpt["tokens"]}
    return cost


def preference_cost(dpo_dir: str) -> dict[str, Any] | None:
    """A DPO adapter's whole training cost: the SFT adapter it started from, the pairs (generating
    the answers, `eval pairs`, as the pairs file's manifest records it) and DPO itself; None for
    the total where a part is unknown."""
    if not dpo_dir or not (Path(dpo_dir) / MANIFEST).is_file():
        return None
    m = json.loads((Path(dpo_dir) / MANIFEST).read_text(encoding="utf-8"))
    cost = training_cost(dpo_dir, m)
    if cost is None:
        return None
    start = (m.get("dpo") or {}).get("start_adapter") or {}
    parts: dict[str, float | None] = {}
    if start:
        parts["SFT"] = start.get("training_seconds")
    pairs = [i for i in m.get("inputs") or [] if (Path(str(i.get("path", ""))).parent / MANIFEST).is_file()]
    for i in pairs:
        pm = json.loads((Path(i["path"]).parent / MANIFEST).read_text(encoding="utf-8"))
        if pm.get("stage") == stages.EVAL_PAIRS:
            parts["pairs"] = (parts.get("pairs") or 0.0) + float(pm.get("seconds") or 0.0)
    parts["DPO"] = cost["train_seconds"]
    known = all(v is not None for v in parts.values())
    return {**cost, "parts": parts, "train_seconds": sum(parts.values()) if known else None,
            "tokens": (cost.get("tokens") or 0) + (start.get("tokens") or 0)}


def pretraining_cost(hf_dir: str) -> dict[str, float] | None:
    """Seconds and tokens of the pretraining run an HF dir was converted from (`convert to-hf`
    records its checkpoint): the seconds summed from its logged throughput (tokens between log
    lines / tokens per second), so checkpoint saves and evaluation are left out."""
    from domainlm.pretrain.checkpoint import open_checkpoint_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    try:
        src = ((open_hf_dir(hf_dir).manifest or {}).get("source") or {}).get("checkpoint")
        rows = [r for r in open_checkpoint_dir(src).metrics() if r.get("kind") == "train"] if src else []
    except (UserError, OSError, ValueError):
        return None
    seconds, last = 0.0, 0
    for r in rows:
        if r.get("tokens_per_s") and r.get("tokens") is not None:
            seconds += (r["tokens"] - last) / r["tokens_per_s"]
            last = r["tokens"]
    return {"seconds": seconds, "tokens": last} if last else None


def _test_questions_in_training(test: list[QA], train: list[QA], cfg: CompareConfig) -> list[str]:
    """Test questions (normalised) that occur in the QA train data or the SFT data files."""
    seen = {metrics.normalize(qa.question) for qa in train}
    for path in [*cfg.inputs.sft_data, *cfg.scratch.sft_data]:
        for qa in read_qa(path) if _is_qa_file(path) else []:
            seen.add(metrics.normalize(qa.question))
    return [qa.question for qa in test if metrics.normalize(qa.question) in seen]


def _is_qa_file(path: str) -> bool:
    p = Path(split_spec(path)[0])
    if not p.is_file():
        return False
    with open(p, encoding="utf-8") as f:
        first = f.readline()
    try:
        rec = json.loads(first)
    except ValueError:
        return False
    return isinstance(rec, dict) and "question" in rec


def _decontamination(test: list[QA], fin: Inputs, names: list[str], build_index, contaminated,
                     summarize_flags) -> dict[str, Any]:
    """13-gram overlap of the test items with each of one family's approaches' sources: the domain
    shards its model was pretrained on (all of the scratch family; only cpt+sft+rag of an existing
    base, whose own pretraining data is not ours to check), the SFT data, the index."""
    sources: dict[str, Any] = {}
    t0 = time.perf_counter()
    scratch = any(family_of(n)[0] for n in names)
    shard_model = fin.model if scratch else fin.cpt_model
    if fin.shards and shard_model and Path(shard_model).is_dir():
        sources["pretraining shards"] = build_index("pretraining shards", _shard_texts(fin.shards, shard_model))
    sft_texts = list(_file_texts(fin.sft_data))
    if sft_texts:
        sources["SFT data"] = build_index("SFT data", sft_texts)
    if fin.index and Path(fin.index).is_dir():
        from domainlm.serve.index_dir import open_index_dir

        sources["index"] = build_index("index", (c.text for c in open_index_dir(fin.index).iter_chunks()))
    flags = {name: summarize_flags(contaminated(test, idx)) for name, idx in sources.items()}
    shards = ["pretraining shards"] if scratch else []
    per = {"zero-shot": shards, "few-shot": shards, "rag": shards + ["index"], "sft": shards + ["SFT data"],
           "sft+rag": shards + ["SFT data", "index"], "cpt+sft+rag": ["pretraining shards", "SFT data", "index"],
           "sft+dpo": shards + ["SFT data"], "sft+rag+dpo": shards + ["SFT data", "index"]}
    out: dict[str, Any] = {n: {s: flags[s] for s in per[family_of(n)[1]] if s in flags} for n in names}
    out["_sources"] = {"n": 13, "seconds": round(time.perf_counter() - t0, 1),
                       "note": "the index holds the gold documents by design: RAG is meant to find the answer there",
                       **{k: {"documents": v.documents} for k, v in sources.items()}}
    return out


def _shard_texts(shards: str, model_dir: str):
    """The pretraining documents as text, decoded with the tokenizer of the model trained on them."""
    from domainlm.data.shards import open_shards_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    sd = open_shards_dir(shards)
    tok = open_hf_dir(model_dir).tokenizer()
    for split in ("train", "valid"):
        if sd.manifest["splits"].get(split, {}).get("shards"):
            for _, ids, _ in sd.documents(split):
                yield tok.decode(ids.tolist())


def _file_texts(paths: list[str]):
    """Every record of the SFT data files as text; FILE:SPLIT keeps the records of that split only
    (a QA file holds its test split too, which is not training data)."""
    for spec in paths:
        path, split = split_spec(spec)
        p = Path(path)
        files = [p] if p.is_file() else sorted(p.glob("*.jsonl"))
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if split and isinstance(rec, dict) and rec.get("split", split) != split:
                        continue
                    yield " ".join(_strings(rec))


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []
