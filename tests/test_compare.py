"""`domainlm compare` end to end on tiny real inputs: a random tiny Llama HF dir, a LoRA adapter
trained by `finetune sft`, a real index, pydoc QA. The table's numbers recompute from the
per-question files, the training cost is the adapter's, decontamination is reported, and bad
configs are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domainlm.eval import metrics
from domainlm.eval.stats import record_file
from domainlm.serve.retrieve import Hit
from tests.conftest import run_cli

APPROACHES = ["zero-shot", "few-shot", "rag", "sft", "sft+rag"]


@pytest.fixture(scope="module")
def compare_inputs(tmp_path_factory, tiny_hf_model, pydoc_corpus, pydoc_index):
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from domainlm.cli import main

    root = tmp_path_factory.mktemp("compare")
    index, qas = pydoc_index
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q.question, "answer": q.answer, "doc_id": q.doc_id}) + "\n"
                            for q in qas[:24]))
    adapter = root / "adapter"
    o, e = StringIO(), StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = main(["finetune", "sft", "--model", str(tiny_hf_model), "--data", f"{pydoc_corpus / 'qa.jsonl'}:train",
                     "--output", str(adapter), "--train.max-steps", "3", "--train.seq-len", "128",
                     "--train.micro-batch-size", "4", "--train.global-batch-size", "4", "--valid-fraction", "0"])
    assert code == 0, e.getvalue()[-3000:]
    return {"root": root, "test": test, "index": index, "adapter": adapter, "model": tiny_hf_model,
            "train": f"{pydoc_corpus / 'qa.jsonl'}:train"}


def compare_args(inp, out, *extra) -> list:
    return ["compare", "--output", out, "--inputs.model", inp["model"], "--inputs.index", inp["index"],
            "--inputs.sft", inp["adapter"], "--inputs.sft-rag", inp["adapter"], "--inputs.sft-data", inp["train"],
            "--qa.train", inp["train"], "--qa.test", inp["test"], "--qa.limit", 8, "--qa.dev", 4,
            "--gen.max-new-tokens", 6, "--consistency-questions", 2, "--consistency-seeds", 2,
            "--latency-questions", 2, "--rag.max-source-tokens", 200, *extra]


def test_compare_writes_a_table_that_recomputes_from_its_answers(compare_inputs, capsys):
    inp = compare_inputs
    out = inp["root"] / "out"
    code, stdout, err = run_cli(compare_args(inp, out), capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert list(report["approaches"]) == APPROACHES and report["questions"] == 8
    assert report["duplicate_questions"] == 0 and report["doc_id_not_in_index"] == 0
    for name, r in report["approaches"].items():
        recs = [json.loads(x) for x in (out / "approaches" / record_file(name)).read_text().splitlines()]
        assert len(recs) == 8
        assert r["exact_match"] == pytest.approx(np.mean([metrics.exact_match(x["answer"], x["gold"]) for x in recs]))
        assert r["f1"] == pytest.approx(np.mean([metrics.token_f1(x["answer"], x["gold"]) for x in recs]))
        assert r["latency"]["n"] == 2 and 0 < r["latency"]["p50_s"] <= r["latency"]["p95_s"]
        assert 0.0 <= r["consistency"]["phrasings"] <= 1.0 and 0.0 <= r["consistency"]["seeds"] <= 1.0
        assert r["cost"]["cpu_s_per_1k_questions"] > 0
        if name in ("rag", "sft+rag"):
            # The index holds every test question's gold document: retrieval is scored, and the
            # decontamination report says so rather than hiding it.
            assert "gold_retrieved" in r and "citation_correct" in r and "faithfulness" in r
            assert r["decontamination"]["index"]["items"] == 8
            # answer_in_sources: the gold answer in the sources the prompt carried, recomputed from
            # them; F1 split by present / absent over exactly those questions
            for x in recs:
                hits = [Hit(s["id"], s["doc_id"], s["source"], s["score"], s["text"]) for s in x["sources"]]
                assert x["answer_in_sources"] == float(metrics.answer_in(x["gold"], metrics.source_texts(hits)))
            split = r["answer_in_sources"]
            for part, want in (("present", 1.0), ("absent", 0.0)):
                mine = [x for x in recs if x["answer_in_sources"] == want]
                if not mine:
                    assert split[part]["questions"] == 0
                    continue
                assert split[part]["questions"] == len(mine) and split[part]["share"] == pytest.approx(len(mine) / 8)
                assert split[part]["f1"] == pytest.approx(np.mean([metrics.token_f1(metrics.strip_citations(
                    x["answer"]), x["gold"]) for x in mine]))
    # The trained approaches carry the adapter's own training cost, as its manifest records it.
    trained = json.loads((inp["adapter"] / "manifest.json").read_text())["training"]
    assert trained["steps"] == 3 and trained["tokens"] > 0 and trained["seconds"] > 0
    for name in ("sft", "sft+rag"):
        cost = report["approaches"][name]["training"]
        assert cost["train_seconds"] == trained["seconds"] and cost["tokens"] == trained["tokens"]
    for name in ("zero-shot", "few-shot", "rag"):
        assert report["approaches"][name]["training"] is None
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| approach", "| ---"))]
    assert [r.split(" | ")[0][2:] for r in rows] == APPROACHES
    sft_row = next(r for r in rows if r.startswith("| sft |"))
    assert f"{trained['tokens']:,} tok" in sft_row
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.splitlines()[2] in stdout                       # the table is printed too


def test_compare_bad_configs_are_one_line_errors(compare_inputs, capsys, tmp_path):
    inp = compare_inputs
    code, _, err = run_cli(compare_args(inp, tmp_path / "a", "--approaches", "zero-shot", "magic"), capsys)
    assert code == 2 and "approaches: unknown 'magic'" in err and "Traceback" not in err
    code, _, err = run_cli(compare_args(inp, tmp_path / "b", "--inputs.sft", tmp_path / "no_adapter",
                                        "--approaches", "sft"), capsys)
    assert code == 2 and "inputs.sft" in err and "finetune sft (stage `finetune`)" in err
    code, _, err = run_cli(compare_args(inp, tmp_path / "c", "--inputs.index", "", "--approaches", "rag"), capsys)
    assert code == 2 and "needs inputs.index, built by index build" in err
    # A test set that overlaps the training data is refused before anything runs.
    code, _, err = run_cli(compare_args(inp, tmp_path / "d", "--qa.train", inp["test"], "--approaches", "zero-shot"),
                           capsys)
    assert code == 2 and "test question(s) are in the training data" in err
    assert not (tmp_path / "d").exists()
    # Held-out questions that say they are the train split (a training file given as the test file).
    code, _, err = run_cli(compare_args(inp, tmp_path / "e", "--qa.test", inp["train"], "--approaches", "zero-shot"),
                           capsys)
    assert code == 2 and 'qa.test: ' in err and 'QA records say "split": "train"; held-out' in err, err
    assert not (tmp_path / "e").exists()


def test_compare_counts_repeated_questions_and_unknown_documents_and_needs_few_shot_examples(compare_inputs, capsys,
                                                                                                 tmp_path):
    """A test question asked twice is scored twice and one naming no document of the index is scored
    as a retrieval miss: both said and counted, not silent. Few-shot with no example left beside
    the dev split is refused (its prompts were zero-shot ones)."""
    inp = compare_inputs
    rows = [json.loads(x) for x in inp["test"].read_text().splitlines()[:3]]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in
                            [*rows, {**rows[0], "question": rows[0]["question"].upper() + " "},
                             {**rows[1], "question": "Something else entirely?", "doc_id": "no-such-doc"}]))
    out = tmp_path / "out"
    code, stdout, err = run_cli(compare_args(inp, out, "--qa.test", test, "--approaches", "zero-shot", "rag",
                                             "--consistency-questions", 0, "--latency-questions", 0), capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["questions"] == 5 and report["duplicate_questions"] == 1 and report["doc_id_not_in_index"] == 1
    assert "1 test question(s) repeat an earlier one and are scored again" in err
    assert "name a doc_id the index does not hold, scored (retrieving or citing" in err
    flat = " ".join(stdout.split())
    assert "duplicate test questions 1 (each scored again)" in flat and "test doc_id not in the index 1" in flat
    recs = [json.loads(x) for x in (out / "approaches" / record_file("rag")).read_text().splitlines()]
    assert next(r for r in recs if r["doc_id"] == "no-such-doc")["gold_retrieved"] == 0.0
    few = tmp_path / "few.jsonl"
    train = [r for r in map(json.loads, open(inp["train"].rsplit(":", 1)[0])) if r.get("split") == "train"][:3]
    few.write_text("".join(json.dumps({k: r[k] for k in ("question", "answer", "source")}) + "\n" for r in train))
    code, _, err = run_cli(compare_args(inp, tmp_path / "f", "--qa.train", few, "--approaches", "few-shot"), capsys)
    assert code == 2 and "leaves 0 few-shot examples for up to" in err and "lower --qa.dev" in err, err
    assert not (tmp_path / "f").exists()
    # a few more: the dev split shrinks (with a warning) so that the largest shot count still fits
    train = [r for r in map(json.loads, open(inp["train"].rsplit(":", 1)[0])) if r.get("split") == "train"][:7]
    few.write_text("".join(json.dumps({k: r[k] for k in ("question", "answer", "source")}) + "\n" for r in train))
    code, _, err = run_cli(compare_args(inp, tmp_path / "f7", "--qa.train", few, "--approaches", "few-shot",
                                        "--qa.limit", 2, "--consistency-questions", 0, "--latency-questions", 0),
                           capsys)
    assert code == 0, err[-3000:]
    prompt = json.loads((tmp_path / "f7" / "compare.json").read_text())["prompt_choice"]
    assert "qa.train holds 7 questions: the dev split (qa.dev 4, whole documents) would leave" in err
    assert 1 <= prompt["dev_questions"] <= 7 - max(map(int, prompt["shots_scores"])) and prompt["dev_questions"] < 4


def test_compare_runs_both_families_with_intervals_and_a_verdict(compare_inputs, capsys):
    """An existing base and a from-scratch model on the same questions: `scratch/` rows use the
    scratch family's inputs, every row carries intervals, the verdict names both families."""

    inp = compare_inputs
    out = inp["root"] / "two"
    names = ["zero-shot", "sft+rag", "scratch/zero-shot", "scratch/rag", "scratch/sft"]
    code, stdout, err = run_cli(compare_args(inp, out, "--approaches", *names, "--scratch.model", inp["model"],
                                             "--scratch.sft", inp["adapter"]), capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert list(report["approaches"]) == names and set(report["prompt_choices"]) == {"base", "scratch"}
    for name, r in report["approaches"].items():
        recs = [json.loads(x) for x in (out / "approaches" / record_file(name)).read_text().splitlines()]
        assert r["f1"] == pytest.approx(np.mean([metrics.token_f1(metrics.strip_citations(x["answer"]), x["gold"])
                                                 for x in recs]))
        lo, hi = r["intervals"]["f1"]
        assert lo <= r["f1"] <= hi
    assert report["best"] in names and report["verdict"].startswith("For this domain")
    # The same model and adapter in both families answer identically (greedy): the families differ
    # only by their inputs, so scratch/zero-shot is zero-shot on the same model.
    assert report["approaches"]["scratch/zero-shot"]["f1"] == pytest.approx(report["approaches"]["zero-shot"]["f1"])
    assert report["approaches"]["scratch/sft"]["training"]["steps"] == 3
    table = (out / "compare.md").read_text()
    assert "trained from scratch" in table and report["verdict"] in table


def test_an_interrupted_compare_resumes_with_the_approaches_it_finished(compare_inputs, capsys, monkeypatch):
    """Interrupted in its second approach, compare keeps the first one's answers and the prompt
    choice beside the output; the rerun answers only the rest and writes what one uninterrupted
    run writes. A rerun with other settings starts afresh; the kept answers go once it is done."""
    from domainlm.eval import compare

    inp = compare_inputs
    names = ["zero-shot", "sft"]
    whole, out = inp["root"] / "whole", inp["root"] / "resumed"
    code, _, err = run_cli(compare_args(inp, whole, "--approaches", *names), capsys)
    assert code == 0, err[-3000:]
    real, real_pick, asked, stop = compare._answer, compare.pick_prompt, [], {"at": "sft"}

    def answer(name, *a, **kw):
        asked.append(name)
        if name == stop["at"]:
            raise KeyboardInterrupt
        return real(name, *a, **kw)

    monkeypatch.setattr(compare, "_answer", answer)
    code, _, err = run_cli(compare_args(inp, out, "--approaches", *names), capsys)
    partial = inp["root"] / ".resumed.partial"
    assert code == 130 and not out.exists() and asked == names
    assert sorted(p.name for p in partial.iterdir()) == ["__prompt-choice.json", "state.json", "zero-shot.json"]
    asked.clear()
    stop["at"] = None
    monkeypatch.setattr(compare, "pick_prompt", lambda *a, **kw: pytest.fail("the prompt choice was kept"))
    code, stdout, err = run_cli(compare_args(inp, out, "--approaches", *names), capsys)
    assert code == 0, err[-3000:]
    assert asked == ["sft"] and not partial.exists()
    assert "answered by an interrupted run" in err and "1 of 2 approaches answered by an interrupted run" in stdout
    a, b = (json.loads((d / "compare.json").read_text()) for d in (whole, out))
    assert a["resumed"] == [] and b["resumed"] == ["zero-shot"] and a["prompt_choice"] == b["prompt_choice"]
    for name in names:
        assert (whole / "approaches" / record_file(name)).read_text() == (out / "approaches" / record_file(name)).read_text()
        for key in ("exact_match", "f1", "intervals", "consistency"):
            assert a["approaches"][name][key] == b["approaches"][name][key]
    # what a run with other settings kept is not used
    monkeypatch.setattr(compare, "pick_prompt", real_pick)
    asked.clear()
    stop["at"] = "sft"
    code, _, _ = run_cli(compare_args(inp, out, "--approaches", *names, "--overwrite"), capsys)
    assert code == 130 and asked == names and (partial / "zero-shot.json").is_file()
    asked.clear()
    stop["at"] = None
    code, _, err = run_cli(compare_args(inp, out, "--approaches", *names, "--overwrite", "--gen.max-new-tokens", 5),
                           capsys)
    assert code == 0 and asked == names and not partial.exists(), err[-3000:]
    assert json.loads((out / "compare.json").read_text())["resumed"] == []


def test_the_answer_budget_from_the_train_answers(compare_inputs, capsys, tiny_hf_model):
    """gen.max_new_tokens 0: ceil(1.2 x the 99th percentile of the QA train answers in the model's
    tokens) + 8, within 16..1024 and half the context; a fixed budget that cuts more than 10% of
    them is warned about; `eval qa` has no train answers and refuses 0."""
    from domainlm.eval.generate import answer_budget
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from domainlm.qa import read_qa

    tok = open_hf_dir(tiny_hf_model).tokenizer()
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in ("one", "one two three", "x " * 60)]
    b = answer_budget(tok, ["one", "one two three", "x " * 60], 512)
    assert b == {"max_new_tokens": min(256, -(-12 * max(lengths) // 10) + 8), "auto": True, "train_answers": 3,
                 "p99_tokens": max(lengths), "longest_tokens": max(lengths), "longer_than_budget": 0}
    assert answer_budget(tok, ["one"] * 5, 512)["max_new_tokens"] == 16            # the floor
    assert answer_budget(tok, ["x " * 400], 256)["max_new_tokens"] == 128          # half the context
    fixed = answer_budget(tok, ["one", "x " * 60], 512, fixed=20)
    assert fixed["max_new_tokens"] == 20 and not fixed["auto"] and fixed["longer_than_budget"] == 1

    inp = compare_inputs
    out = inp["root"] / "budget"
    code, stdout, err = run_cli(compare_args(inp, out, "--approaches", "zero-shot", "--gen.max-new-tokens", 0), capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "compare.json").read_text())
    train = read_qa(inp["train"])
    want = answer_budget(tok, [q.answer for q in train], open_hf_dir(inp["model"]).max_positions)
    assert report["answer_budget"] == {"base": want} and want["auto"] and 16 <= want["max_new_tokens"] <= 256
    recs = [json.loads(x) for x in (out / "approaches" / record_file("zero-shot")).read_text().splitlines()]
    assert max(r["tokens_out"] for r in recs) <= want["max_new_tokens"]
    assert f"up to {want['max_new_tokens']} tokens (gen.max_new_tokens 0" in err
    assert (f"Answers up to {want['max_new_tokens']} tokens, from the QA train answers' lengths."
            in (out / "compare.md").read_text())
    code, stdout, err = run_cli(compare_args(inp, inp["root"] / "budget6", "--approaches", "zero-shot"), capsys)
    assert code == 0 and "gen.max_new_tokens 6 leaves" in err and "answers that long are cut" in err, err[-3000:]
    code, _, err = run_cli(["eval", "qa", "--model", inp["model"], "--data", inp["test"], "--mode", "zero-shot",
                            "--gen.max-new-tokens", 0, "--output", inp["root"] / "qa0"], capsys)
    assert code == 2 and "gen.max_new_tokens 0 (from the QA train answers' lengths) is for `compare`" in err


def test_compare_needs_the_family_inputs(compare_inputs, capsys, tmp_path):
    inp = compare_inputs
    code, _, err = run_cli(compare_args(inp, tmp_path / "a", "--approaches", "scratch/sft"), capsys)
    assert code == 2 and "needs scratch.model" in err
    code, _, err = run_cli(compare_args(inp, tmp_path / "b", "--approaches", "cpt+sft+rag"), capsys)
    assert code == 2 and "needs inputs.cpt_model" in err
    code, _, err = run_cli(compare_args(inp, tmp_path / "c", "--approaches", "other/sft"), capsys)
    assert code == 2 and "approaches: unknown 'other/sft'" in err


def test_compare_rows_of_dpo_adapters_from_their_own_pairs(compare_inputs, capsys):
    """eval pairs -> finetune dpo -> the rows sft+dpo and sft+rag+dpo: scored like the others, their
    training time the SFT adapter's + generating the pairs + DPO, from the three manifests."""
    inp = compare_inputs
    root = inp["root"]
    code, _, err = run_cli(["eval", "pairs", "--model", inp["model"], "--adapter", inp["adapter"], "--data", inp["train"],
                            "--limit", 12, "--samples", 0, "--gen.max-new-tokens", 8, "--output", root / "pairs"], capsys)
    assert code == 0, err[-3000:]
    pairs = json.loads((root / "pairs" / "manifest.json").read_text())
    assert pairs["counts"]["pairs"] >= 6
    code, _, err = run_cli(["finetune", "dpo", "--model", inp["model"], "--adapter", inp["adapter"], "--data",
                            root / "pairs" / "pairs.jsonl", "--output", root / "dpo", "--train.max-steps", 3,
                            "--train.seq-len", 128, "--train.micro-batch-size", 2, "--train.global-batch-size", 4,
                            "--valid-fraction", 0, "--log.tensorboard", "false"], capsys)
    assert code == 0, err[-3000:]
    dpo = json.loads((root / "dpo" / "manifest.json").read_text())
    out = root / "out_dpo"
    names = ["sft", "sft+dpo", "sft+rag+dpo"]
    code, _, err = run_cli(compare_args(inp, out, "--approaches", *names, "--inputs.sft-dpo", root / "dpo",
                                        "--inputs.sft-rag-dpo", root / "dpo", "--consistency-questions", 0), capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert list(report["approaches"]) == names
    sft = json.loads((inp["adapter"] / "manifest.json").read_text())["training"]["seconds"]
    for name in ("sft+dpo", "sft+rag+dpo"):
        r = report["approaches"][name]
        recs = [json.loads(x) for x in (out / "approaches" / record_file(name)).read_text().splitlines()]
        assert r["f1"] == pytest.approx(np.mean([metrics.token_f1(metrics.strip_citations(x["answer"]), x["gold"])
                                                 for x in recs]))
        assert r["training"]["parts"] == {"SFT": sft, "pairs": pairs["seconds"], "DPO": dpo["training"]["seconds"]}
        assert r["training"]["train_seconds"] == pytest.approx(sft + pairs["seconds"] + dpo["training"]["seconds"])
    assert "sources" in json.loads((out / "approaches" / record_file("sft+rag+dpo")).read_text().splitlines()[0])
    assert "sources" not in json.loads((out / "approaches" / record_file("sft+dpo")).read_text().splitlines()[0])


def test_compare_bad_numbers_duplicates_and_templates_are_one_line(tmp_path, capsys):
    """Refused by the config check (or, for the template, before anything runs): one line each,
    never a ValueError/KeyError from deep inside, never a silently doubled row."""
    base = ["compare", "--output", tmp_path / "out", "--inputs.model", tmp_path / "m", "--qa.train",
            tmp_path / "qa.jsonl:train", "--qa.test", tmp_path / "qa.jsonl:test", "--approaches", "zero-shot"]
    cases = [(["--qa.limit", -1], "qa.limit must be >= 0 (0: every test question), got -1"),
             (["--qa.dev", -1], "qa.dev must be >= 1"),
             (["--qa.dev", 0], "qa.dev must be >= 1"),
             (["--consistency-seeds", -1], "consistency_seeds and latency_questions must be >= 0, got 32, -1 and 16"),
             (["--consistency-seeds", 1], "consistency_seeds must be >= 2"),
             (["--latency-questions", -2], "must be >= 0"),
             (["--gen.threads", -1], "gen.threads must be >= 0"),
             (["--gen.temperature", -0.5], "gen.temperature must be >= 0"),
             (["--approaches", "zero-shot", "rag", "zero-shot"], "approaches: 'zero-shot' given twice"),
             (["--prompt.template", "nope"], "no template 'nope'; templates: plain, direct")]
    for extra, message in cases:
        code, _, err = run_cli([*base, *extra], capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli([*base, "--consistency-seeds", 1, "--consistency-questions", 0], capsys)
    assert "consistency_seeds" not in err          # unused when the checks are off: the next check speaks


def _short_model_and_qa(tokenizer_dir, pydoc_corpus, tmp_path, seed: int = 0):
    from tests.conftest import tiny_llama

    return (tiny_llama(tmp_path / "short", tokenizer_dir, seed=seed, max_position_embeddings=64),
            f"{pydoc_corpus / 'qa.jsonl'}:train", f"{pydoc_corpus / 'qa.jsonl'}:test")


def test_compare_refuses_an_adapter_for_another_base_before_answering(tiny_hf_model, tokenizer_dir, pydoc_corpus,
                                                                     tmp_path, capsys, monkeypatch):
    """An adapter trained on another base is refused before the first question is answered (it
    used to fail after every zero-shot answer was made, losing them)."""
    from domainlm.eval.generate import Generator
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from tests.conftest import lora_model

    other, train, test = _short_model_and_qa(tokenizer_dir, pydoc_corpus, tmp_path, seed=5)
    adapter = tmp_path / "adapter"
    lora_model(other).save_pretrained(str(adapter))
    (adapter / "manifest.json").write_text(json.dumps({"stage": "finetune sft", "base_model": {
        "path": str(other), "weights_sha256": open_hf_dir(other).weights_sha256()}}))
    calls = []
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **k: calls.append(1) or [])
    code, _, err = run_cli(["compare", "--output", tmp_path / "out", "--inputs.model", tiny_hf_model, "--inputs.sft",
                            adapter, "--approaches", "zero-shot", "sft", "--qa.train", train, "--qa.test", test,
                            "--qa.limit", 4, "--qa.dev", 4], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and f"adapter {str(adapter)!r} was trained on" in errors[0]
    assert "give the base model it was trained on" in errors[0]
    assert calls == [] and "approach zero-shot" not in err and not (tmp_path / "out").exists()


def test_compare_counts_prompts_cut_to_the_context(tokenizer_dir, pydoc_corpus, tmp_path, capsys):
    """Few-shot prompts longer than a 64-token context keep their end (the numbers stay those of
    before) and are counted per row: compare.json, the summary and the table's footnote."""
    model, train, test = _short_model_and_qa(tokenizer_dir, pydoc_corpus, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["compare", "--output", out, "--inputs.model", model, "--approaches", "zero-shot",
                                 "few-shot", "--qa.train", train, "--qa.test", test, "--qa.limit", 6, "--qa.dev", 4,
                                 "--gen.max-new-tokens", 4, "--consistency-questions", 0, "--latency-questions", 1],
                                capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "compare.json").read_text())
    cuts = {}
    for name, r in report["approaches"].items():
        recs = [json.loads(x) for x in (out / "approaches" / record_file(name)).read_text().splitlines()]
        assert r["truncated"] == sum(x["truncated"] for x in recs)
        assert all(x["tokens_in"] == 64 - 4 for x in recs if x["truncated"])
        cuts[name] = r["truncated"]
    assert cuts["few-shot"] > 0
    said = ", ".join(f"{n} {c}" for n, c in cuts.items() if c)
    assert "prompts cut to fit the context" in stdout and f"{said} (kept their end)" in stdout
    assert f"Prompts cut to fit the model's context (their end kept, the start lost): {said}." in \
        (out / "compare.md").read_text()
    assert "prompts (few-shot) are longer than the model's context of 64 tokens" in err
