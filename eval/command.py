"""`domainlm eval qa | ppl | retrieval | rag-data`: thin entry points over qa.py, ppl.py, retrieval.py
and rag_data.py."""

from __future__ import annotations

import json
from pathlib import Path

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, check_output_file, describe_inputs, is_json_object, make_manifest, write_json
from domainlm.progress import log, summary
from domainlm.qa import read_qa, refuse_test_split, sample, split_spec


def device_of(choice: str, option: str = "--gen.device") -> str:
    """auto as cuda or cpu; cuda where there is none refused (the check serve and index build make)."""
    from domainlm.serve.config import resolve_device

    return resolve_device(choice, option)


def library_path(cfg_path: str) -> str:
    """The prompt library given, else the one shipped with the package."""
    if cfg_path:
        return cfg_path
    from domainlm import configs

    return str(Path(configs.__file__).parent / "prompts" / "qa.yaml")


def _inputs(*paths: str | None) -> list[dict]:
    """The inputs as the manifest records them (a QA path's :split suffix dropped)."""
    return describe_inputs([Path(split_spec(p)[0]) for p in paths if p])


def qa(cfg) -> int:
    from domainlm.eval.generate import Generator, cpu_threads, torch_dtype
    from domainlm.eval.prompts import load_library
    from domainlm.eval.config import decoding
    from domainlm.eval.qa import Approach, answer_and_score, summarize
    from domainlm.serve.prompt import check_budget

    items = read_qa(cfg.data)
    items = items[: cfg.limit] if cfg.limit else items
    library = load_library(library_path(cfg.prompt.library), cfg.prompt.domain)
    library.template(cfg.prompt.template)
    pool = read_qa(cfg.prompt.few_shot_data) if cfg.mode == "few-shot" else []
    refuse_test_split(pool, "prompt.few_shot_data", "few-shot examples", cfg.prompt.few_shot_data)
    retriever = None
    device = device_of(cfg.gen.device)
    if cfg.mode == "rag":
        from domainlm.eval.retrieval import with_index_ids
        from domainlm.serve.retrieve import open_retriever

        retriever = open_retriever(cfg.index, device=device)     # the embedder where the model runs (--gen.device)
        items = with_index_ids(items, retriever)
    gen = Generator(cfg.model, cfg.adapter, device=device, dtype=torch_dtype(cfg.gen.dtype, device))
    approach = Approach(mode=cfg.mode, template=cfg.prompt.template, shots=cfg.prompt.shots, top_k=cfg.rag.top_k,
                        retrieval_mode=cfg.rag.mode, max_source_tokens=cfg.rag.max_source_tokens)
    if cfg.mode == "rag":
        check_budget(cfg.rag.max_source_tokens, gen.max_positions, "rag.max_source_tokens")
    with StageOutput(cfg.output, stages.EVAL_QA, overwrite=cfg.overwrite) as out, cpu_threads(cfg.gen.threads):
        log.info("answering %d questions (%s)", len(items), cfg.mode)
        records, cost = answer_and_score(gen, items, approach, library, pool=pool, retriever=retriever,
                                         seed=cfg.prompt.seed, **decoding(cfg.gen))
        with open(out.tmp / "results.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        result = {**summarize(records), **cost, "library_version": library.version,
                  "decoding": {"temperature": cfg.gen.temperature, "top_p": cfg.gen.top_p, "seed": cfg.prompt.seed}}
        write_json(out.tmp / "summary.json", result)
        out.commit(make_manifest(stages.EVAL_QA, cfg, _inputs(cfg.model, cfg.adapter, cfg.index, *cfg.data),
                                 summary=result))
    rows = [("questions", result["questions"]),
            ("decoding", "greedy" if cfg.gen.temperature <= 0 else
             f"sampled: temperature {cfg.gen.temperature:g}, top_p {cfg.gen.top_p:g}, seed {cfg.prompt.seed}"),
            ("exact match", f"{result['exact_match']:.3f}"),
            ("token F1", f"{result['f1']:.3f}"), ("contains", f"{result['contains']:.3f}")]
    if "citation_correct" in result:
        rows += [("gold retrieved", f"{result['gold_retrieved']:.3f}"),
                 ("citation correct", f"{result['citation_correct']:.3f}"),
                 ("faithfulness", f"{result['faithfulness']:.3f}")]
    if result["truncated"]:
        rows.append(("prompts cut to fit the context", f"{result['truncated']} (kept their end; "
                                                        f"truncated in results.jsonl)"))
    rows += [("wall / CPU s", f"{cost['wall_s']:.1f} / {cost['cpu_s']:.1f}"),
             ("per-question results", str(Path(cfg.output) / "results.jsonl"))]
    summary(f"eval qa: {cfg.mode}", rows)
    return 0


def ppl(cfg) -> int:
    from transformers import AutoModelForCausalLM

    from domainlm.eval.ppl import perplexity, token_stream
    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    if cfg.output:           # before the work: not a directory, not an input, not a file of something else
        check_output_file(cfg.output, inputs=[*(cfg.input or []), *([cfg.shards] if cfg.shards else [])],
                          ours=is_json_object)
    hf = open_hf_dir(cfg.model)
    tok = hf.tokenizer()
    device = device_of(cfg.device, "--device")
    model = AutoModelForCausalLM.from_pretrained(str(hf.path))
    if cfg.adapter:
        from peft import PeftModel

        ad = open_adapter_dir(cfg.adapter)
        ad.check_base(hf)
        model = PeftModel.from_pretrained(model, str(ad.path))
    seq_len = cfg.seq_len
    if hf.max_positions and seq_len > hf.max_positions:
        seq_len = hf.max_positions
        log.warning("eval ppl: windows are held to %d tokens, the model's context (max_position_embeddings), not "
                    "--seq-len %d", seq_len, cfg.seq_len)
    stream, source = token_stream(hf.path, tok, shards=cfg.shards, split=cfg.split, inputs=cfg.input,
                                  max_tokens=cfg.max_tokens, text_field=cfg.text_field)
    result = {**perplexity(model.to(device).eval(), stream, seq_len, device), "seq_len": seq_len, **source}
    if cfg.output:
        write_json(cfg.output, result)
    summary("eval ppl", [("model", cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")),
                         ("scored", f"{result['tokens']:,} tokens of {result['documents']:,} documents in "
                                    f"{result['windows']:,} windows of {seq_len}"
                                    + (f" (the model's context; --seq-len {cfg.seq_len} held to it)"
                                       if seq_len < cfg.seq_len else "")),
                         ("loss", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.2f}")])
    return 0


def retrieval(cfg) -> int:
    from domainlm.eval.retrieval import known_documents, retrieval_metrics
    from domainlm.serve.prompt import check_budget, token_counter
    from domainlm.serve.retrieve import open_retriever

    device = device_of(cfg.device, "--device")
    if cfg.output:
        check_output_file(cfg.output, inputs=[split_spec(d)[0] for d in cfg.data], ours=is_json_object)
    items = read_qa(cfg.data)
    items = items[: cfg.limit] if cfg.limit else items
    retriever = open_retriever(cfg.index, settings=cfg.retrieval, device=device)
    items, unknown = known_documents(items, retriever, cfg.data, cfg.index)
    if cfg.model:
        from domainlm.pretrain.convert.hfdir import open_hf_dir

        hf = open_hf_dir(cfg.model)
        tok, counted = hf.tokenizer(), f"{cfg.model}'s tokenizer"
        check_budget(cfg.max_source_tokens, hf.max_positions or 2048, "max_source_tokens")
    else:
        tok, counted = retriever.embedder.tokenizer, "the embedder's tokenizer"
    count, cut = token_counter(tok)
    result = retrieval_metrics(retriever, items, cfg.modes, cfg.top_k, count_tokens=count, cut_tokens=cut,
                               budget=cfg.max_source_tokens, sources_top_k=cfg.sources_top_k)
    result_all = {"modes": result, "questions": len(items), "doc_id_not_in_index": len(unknown),
                  "chunking": retriever.index.chunking, "budget_counted_with": counted}
    if cfg.output:
        write_json(cfg.output, result_all)
    k = cfg.top_k
    rows = [(mode, f"recall@1 {r['recall@1']:.3f}  recall@{k} {r[f'recall@{k}']:.3f}  MRR {r[f'mrr@{k}']:.3f}  "
                   f"answer in sources {r['answer_in_sources']:.3f} ({r['sources_per_question']:.1f} sources)  "
                   f"answer@1/2/4/8 {r['answer_in@1']:.2f}/{r['answer_in@2']:.2f}/{r['answer_in@4']:.2f}/"
                   f"{r['answer_in@8']:.2f}  {r['ms_per_query']:.1f} ms/query") for mode, r in result.items()]
    rows.append(("sources budget", f"{cfg.max_source_tokens} tokens ({counted}), at most {cfg.sources_top_k} "
                                   f"chunks; {retriever.index.chunking} chunking"
                 if cfg.max_source_tokens else f"none, {cfg.sources_top_k} chunks"))
    if unknown:
        rows.append(("left out", f"{len(unknown)} QA items whose doc_id is not in the index"))
    summary(f"eval retrieval: {len(items)} questions", rows)
    return 0


def rag_data(cfg) -> int:
    from domainlm.eval.generate import answer_budget
    from domainlm.eval.rag_data import rag_samples, write_jsonl
    from domainlm.serve.prompt import check_budget
    from domainlm.eval.retrieval import known_documents
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from domainlm.serve.retrieve import open_retriever

    device = device_of(cfg.device, "--device")
    items = read_qa(cfg.data)
    refuse_test_split(items, "data", "SFT+RAG samples", cfg.data)
    hf = open_hf_dir(cfg.model)
    budget = answer_budget(hf.tokenizer(), [qa.answer for qa in items], hf.max_positions or 2048, cfg.max_new_tokens)
    items = sample(items, cfg.limit, cfg.seed)
    room = (hf.max_positions or 2048) - budget["max_new_tokens"] - 8
    check_budget(cfg.rag.max_source_tokens, hf.max_positions or 2048, "rag.max_source_tokens")
    retriever = open_retriever(cfg.index, device=device)
    items, unknown = known_documents(items, retriever, cfg.data, cfg.index)
    with StageOutput(cfg.output, stages.EVAL_RAG_DATA, overwrite=cfg.overwrite) as out:
        rows, counts = rag_samples(items, retriever, cfg.rag.top_k, cfg.rag.mode, hf.tokenizer(), room,
                                   cfg.rag.max_source_tokens)
        counts["doc_id_not_in_index"] = len(unknown)
        write_jsonl(out.tmp / "train.jsonl", rows)
        out.commit(make_manifest(stages.EVAL_RAG_DATA, cfg, inputs_rag_data(cfg), counts=counts,
                                 files={"train": "train.jsonl"}, answer_budget=budget, prompt_room=room))
    cited = counts["cited_by_words"] + counts["cited_by_gold"]
    how = "from the answers: p99" if budget["auto"] else "max_new_tokens; answers p99"
    summary("eval rag-data", [("samples", f"{counts['samples']:,}"),
                              ("gold document retrieved", f"{counts['gold_retrieved']:,}"),
                              ("gold document missed", f"{counts['gold_missed']:,}"),
                              *([("no doc_id", f"{counts['no_doc_id']:,} (no gold document: only a source holding the "
                                               "answer's words is cited; give doc_id, the corpus id that holds the "
                                               "answer)")]
                                if counts["no_doc_id"] else []),
                              ("cited", f"{cited:,} answers cite a source as [n]: {counts['cited_by_words']:,} the "
                                        f"first holding the answer's words, {counts['cited_by_gold']:,} the gold "
                                        f"document's first chunk; {counts['samples'] - cited:,} answer without one"),
                              *([("doc_id not in the index", f"{len(unknown):,} (left out)")] if unknown else []),
                              ("answer in the sources", f"{counts['answer_in_sources']:,} of {counts['samples']:,}"
                               f" (sources budget {cfg.rag.max_source_tokens or 'the context'} tokens)"),
                              ("answer room", f"{budget['max_new_tokens']} tokens left for the answer ({how} "
                                              f"{budget['p99_tokens']}, {budget['longer_than_budget']:,} of "
                                              f"{budget['train_answers']:,} longer); prompts up to {room:,} tokens"),
                              ("written", str(Path(cfg.output) / "train.jsonl"))])
    return 0


def inputs_qa(cfg) -> list[dict]:
    return _inputs(cfg.model, cfg.adapter, cfg.index, *cfg.data)


def inputs_pairs(cfg) -> list[dict]:
    return _inputs(cfg.model, cfg.adapter, cfg.index, *cfg.data)


def inputs_rag_data(cfg) -> list[dict]:
    return _inputs(cfg.index, cfg.model, *cfg.data)
