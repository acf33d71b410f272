"""`domainlm eval qa | ppl | retrieval | rag-data`: thin entry points over qa.py, ppl.py, retrieval.py
and rag_data.py."""

from __future__ import annotations

import json
from pathlib import Path

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, describe_inputs, make_manifest, write_json
from domainlm.progress import log, summary
from domainlm.qa import read_qa, sample, split_spec


def device_of(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: no CUDA device here; use --gen.device cpu (or auto)")
    return "cuda" if choice == "auto" and torch.cuda.is_available() else ("cpu" if choice == "auto" else choice)


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
    from domainlm.eval.qa import Approach, answer_and_score, summarize

    items = read_qa(cfg.data)
    items = items[: cfg.limit] if cfg.limit else items
    library = load_library(library_path(cfg.prompt.library), cfg.prompt.domain)
    library.template(cfg.prompt.template)
    pool = read_qa(cfg.prompt.few_shot_data) if cfg.mode == "few-shot" else []
    retriever = None
    if cfg.mode == "rag":
        from domainlm.serve.retrieve import open_retriever

        retriever = open_retriever(cfg.index)
    device = device_of(cfg.gen.device)
    gen = Generator(cfg.model, cfg.adapter, device=device, dtype=torch_dtype(cfg.gen.dtype, device))
    approach = Approach(mode=cfg.mode, template=cfg.prompt.template, shots=cfg.prompt.shots, top_k=cfg.rag.top_k,
                        retrieval_mode=cfg.rag.mode)
    with StageOutput(cfg.output, stages.EVAL_QA, overwrite=cfg.overwrite) as out, cpu_threads(cfg.gen.threads):
        log.info("answering %d questions (%s)", len(items), cfg.mode)
        records, cost = answer_and_score(gen, items, approach, library, pool=pool, retriever=retriever,
                                         seed=cfg.prompt.seed, max_new_tokens=cfg.gen.max_new_tokens,
                                         batch_size=cfg.gen.batch_size)
        with open(out.tmp / "results.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        result = {**summarize(records), **cost, "library_version": library.version}
        write_json(out.tmp / "summary.json", result)
        out.commit(make_manifest(stages.EVAL_QA, cfg, _inputs(cfg.model, cfg.adapter, cfg.index, *cfg.data),
                                 summary=result))
    rows = [("questions", result["questions"]), ("exact match", f"{result['exact_match']:.3f}"),
            ("token F1", f"{result['f1']:.3f}"), ("contains", f"{result['contains']:.3f}")]
    if "citation_correct" in result:
        rows += [("gold retrieved", f"{result['gold_retrieved']:.3f}"),
                 ("citation correct", f"{result['citation_correct']:.3f}"),
                 ("faithfulness", f"{result['faithfulness']:.3f}")]
    rows += [("wall / CPU s", f"{cost['wall_s']:.1f} / {cost['cpu_s']:.1f}"),
             ("per-question results", str(Path(cfg.output) / "results.jsonl"))]
    summary(f"eval qa: {cfg.mode}", rows)
    return 0


def ppl(cfg) -> int:
    from transformers import AutoModelForCausalLM

    from domainlm.eval.ppl import perplexity, token_stream
    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    hf = open_hf_dir(cfg.model)
    tok = hf.tokenizer()
    device = device_of(cfg.device)
    model = AutoModelForCausalLM.from_pretrained(str(hf.path))
    if cfg.adapter:
        from peft import PeftModel

        ad = open_adapter_dir(cfg.adapter)
        ad.check_base(hf)
        model = PeftModel.from_pretrained(model, str(ad.path))
    stream, source = token_stream(hf.path, tok, shards=cfg.shards, split=cfg.split, inputs=cfg.input,
                                  max_tokens=cfg.max_tokens)
    result = {**perplexity(model.to(device).eval(), stream, cfg.seq_len, device), **source}
    if cfg.output:
        write_json(cfg.output, result)
    summary("eval ppl", [("model", cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")),
                         ("scored", f"{result['tokens']:,} tokens of {result['documents']:,} documents"),
                         ("loss", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.2f}")])
    return 0


def retrieval(cfg) -> int:
    from domainlm.eval.retrieval import retrieval_metrics
    from domainlm.serve.retrieve import open_retriever

    items = read_qa(cfg.data)
    items = items[: cfg.limit] if cfg.limit else items
    result = retrieval_metrics(open_retriever(cfg.index), items, cfg.modes, cfg.top_k)
    if cfg.output:
        write_json(cfg.output, result)
    k = cfg.top_k
    rows = [(mode, f"recall@1 {r['recall@1']:.3f}  recall@{k} {r[f'recall@{k}']:.3f}  MRR {r[f'mrr@{k}']:.3f}  "
                   f"{r['ms_per_query']:.1f} ms/query") for mode, r in result.items()]
    summary(f"eval retrieval: {len(items)} questions", rows)
    return 0


def rag_data(cfg) -> int:
    from domainlm.eval.rag_data import rag_samples, write_jsonl
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from domainlm.serve.retrieve import open_retriever

    items = read_qa(cfg.data)
    if any(qa.split == "test" for qa in items):
        raise UserError("data: these QA records are the test split; SFT+RAG data comes from the train split "
                        "(e.g. qa.jsonl:train)")
    items = sample(items, cfg.limit, cfg.seed)
    hf = open_hf_dir(cfg.model)
    room = (hf.max_positions or 2048) - cfg.max_new_tokens - 8
    with StageOutput(cfg.output, stages.EVAL_RAG_DATA, overwrite=cfg.overwrite) as out:
        rows, counts = rag_samples(items, open_retriever(cfg.index), cfg.rag.top_k, cfg.rag.mode, hf.tokenizer(), room)
        write_jsonl(out.tmp / "train.jsonl", rows)
        out.commit(make_manifest(stages.EVAL_RAG_DATA, cfg, inputs_rag_data(cfg), counts=counts,
                                 files={"train": "train.jsonl"}))
    summary("eval rag-data", [("samples", f"{counts['samples']:,}"),
                              ("gold source retrieved", f"{counts['gold_retrieved']:,} (cited as [n])"),
                              ("gold source missed", f"{counts['gold_missed']:,} (answered without it)"),
                              ("written", str(Path(cfg.output) / "train.jsonl"))])
    return 0


def inputs_qa(cfg) -> list[dict]:
    return _inputs(cfg.model, cfg.adapter, cfg.index, *cfg.data)


def inputs_rag_data(cfg) -> list[dict]:
    return _inputs(cfg.index, cfg.model, *cfg.data)
