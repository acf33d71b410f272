"""`domainlm eval pairs`: preference pairs from a model's own failures on QA train questions.

questions (train split, seeded sample) -> the prompts `compare` scores the adapter with (the
question alone, or the SFT+RAG prompt with retrieved sources) -> one greedy answer and N sampled
ones (transformers' generate through `eval/generate.py`) -> token F1 of each against the gold ->
a pair where an answer is wrong: rejected = the greedy answer when wrong (what the model says when
scored), else the worst sample; chosen = the gold answer as the adapter learned answers -> pairs.jsonl
(TRL's preference format) + manifest.json with the counts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, make_manifest
from domainlm.progress import log, summary
from domainlm.qa import QA, read_qa, refuse_test_split, sample, token_f1


def choose(qa: QA, answers: list[str], chosen: str, below: float) -> tuple[dict[str, Any] | None, str]:
    """(the pair's fields, or None, and the reason): answers[0] is the greedy answer."""
    from domainlm.eval.metrics import strip_citations

    scores = [token_f1(strip_citations(a), qa.answer) for a in answers]
    wrong = [i for i, s in enumerate(scores) if s < below and answers[i].strip()]
    if not wrong:
        return None, "all_right" if all(a.strip() for a in answers) else "no_wrong_answer"
    pick = 0 if 0 in wrong else min(wrong, key=lambda i: (scores[i], i))
    rejected = answers[pick]
    if " ".join(rejected.split()) == " ".join(chosen.split()):
        return None, "rejected_equals_chosen"
    return {"chosen": chosen, "rejected": rejected, "rejected_f1": round(scores[pick], 4),
            "rejected_from": "greedy" if pick == 0 else f"sample {pick}", "f1": [round(s, 4) for s in scores]}, "pair"


def pairs(cfg) -> int:
    """Entry point of `domainlm eval pairs`."""
    from domainlm.eval.command import device_of, inputs_pairs, library_path
    from domainlm.eval.generate import Generator, cpu_threads, torch_dtype, warn_cut
    from domainlm.eval.prompts import load_library
    from domainlm.eval.qa import Approach, build_prompts
    from domainlm.eval.rag_data import cited_answer, write_jsonl

    t0 = time.perf_counter()
    items = read_qa(cfg.data)
    refuse_test_split(items, "data", "preference pairs", cfg.data)
    items = sample(items, cfg.limit, cfg.seed)
    if not items:
        raise UserError(f"data: no QA record in {', '.join(cfg.data)}")
    if cfg.index:
        from domainlm.pretrain.convert.hfdir import open_hf_dir
        from domainlm.serve.prompt import check_budget

        check_budget(cfg.rag.max_source_tokens, open_hf_dir(cfg.model).max_positions or 2048, "rag.max_source_tokens")
    device = device_of(cfg.gen.device)
    retriever, unknown = None, []
    if cfg.index:
        from domainlm.eval.retrieval import known_documents
        from domainlm.serve.retrieve import open_retriever

        retriever = open_retriever(cfg.index, device=device)
        items, unknown = known_documents(items, retriever, cfg.data, cfg.index)
    library = load_library(library_path(""))
    approach = Approach("rag", "plain", top_k=cfg.rag.top_k, retrieval_mode=cfg.rag.mode,
                        max_source_tokens=cfg.rag.max_source_tokens) if cfg.index else Approach("zero-shot", "plain")
    described = inputs_pairs(cfg)
    with StageOutput(cfg.output, stages.EVAL_PAIRS, overwrite=cfg.overwrite) as out, \
            cpu_threads(cfg.gen.threads if device == "cpu" else 0):
        gen = Generator(cfg.model, cfg.adapter or None, device=device, dtype=torch_dtype(cfg.gen.dtype, device))
        prompts, hits = build_prompts(items, approach, library, retriever=retriever, seed=cfg.seed, tok=gen.tok,
                                      room=gen.room(cfg.gen.max_new_tokens))
        log.info("eval pairs: %d questions x %d answers (greedy + %d sampled)", len(items), 1 + cfg.samples,
                 cfg.samples)
        kw = dict(max_new_tokens=cfg.gen.max_new_tokens, batch_size=cfg.gen.batch_size)
        greedy = gen.generate(prompts, **kw)
        answers = [[g.text for g in greedy]]
        cut = warn_cut(greedy, gen.max_positions, cfg.gen.max_new_tokens)
        for s in range(1, cfg.samples + 1):
            answers.append([g.text for g in gen.generate(prompts, temperature=cfg.temperature, top_p=cfg.top_p,
                                                         seed=cfg.seed * 1_000_003 + s, **kw)])
        rows, counts = [], {"questions": len(items), "answers": len(items) * (1 + cfg.samples), "pairs": 0,
                            "greedy_wrong": 0, "all_right": 0, "no_wrong_answer": 0, "rejected_equals_chosen": 0,
                            "doc_id_not_in_index": len(unknown), "prompts_cut_to_context": cut}
        for i, qa in enumerate(items):
            chosen = cited_answer(qa, hits[i])[0] if cfg.index else qa.answer
            pair, why = choose(qa, [a[i] for a in answers], chosen, cfg.rejected_below)
            if pair is None:
                counts[why] += 1
                continue
            counts["pairs"] += 1
            counts["greedy_wrong"] += pair["rejected_from"] == "greedy"
            rows.append({"messages": prompts[i], **pair, "id": qa.id, "doc_id": qa.doc_id, "gold": qa.answer})
        if not rows:
            raise UserError(f"no preference pair: the model answered all {len(items)} questions right (token F1 >= "
                            f"{cfg.rejected_below}) in every answer; raise --samples or --rejected-below, or give "
                            "more questions (--limit)")
        write_jsonl(out.tmp / "pairs.jsonl", rows)
        seconds = time.perf_counter() - t0
        out.commit(make_manifest(stages.EVAL_PAIRS, cfg, described, counts=counts, seconds=round(seconds, 2),
                                 files={"pairs": "pairs.jsonl"}))
    summary("eval pairs", [
        ("model", f"{cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "")),
        ("prompts", "SFT+RAG (retrieved sources)" if cfg.index else "the question alone"),
        ("questions", f"{counts['questions']:,} x {1 + cfg.samples} answers (greedy + {cfg.samples} sampled at "
                      f"temperature {cfg.temperature:g})"),
        ("pairs", f"{counts['pairs']:,} (rejected: the greedy answer in {counts['greedy_wrong']:,}, a sample in "
                  f"{counts['pairs'] - counts['greedy_wrong']:,}; wrong = F1 < {cfg.rejected_below:g})"),
        ("no pair", f"all answers right {counts['all_right']:,}, rejected = chosen {counts['rejected_equals_chosen']:,}"
                    + (f", document not in the index {len(unknown):,}" if unknown else "")),
        *([("prompts cut to fit the context", f"{cut:,} (answered from their end; lower rag.max_source_tokens or "
                                               f"gen.max_new_tokens)")] if cut else []),
        ("written", str(Path(cfg.output) / "pairs.jsonl")), ("time", f"{seconds:.1f}s"),
        ("next", f"domainlm finetune dpo --model {cfg.model}" + (f" --adapter {cfg.adapter}" if cfg.adapter else "")
                 + f" --data {Path(cfg.output) / 'pairs.jsonl'} --output OUT")])
    return 0
