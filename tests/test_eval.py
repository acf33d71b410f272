"""Evaluation: metrics against reference values, the prompt library, decontamination, batched
generation against one `generate` per question, perplexity against stock transformers, `eval qa`
end to end, and our HF dir + adapter in lm-evaluation-harness."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from domainlm.errors import UserError
from domainlm.eval import metrics
from domainlm.qa import QA
from tests.conftest import run_cli


# -- metrics ------------------------------------------------------------------------------------


def test_squad_normalisation_exact_match_and_f1():
    # reference values computed by hand with SQuAD v1.1's evaluate script rules
    assert metrics.normalize("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("the answer.", "Answer") == 1.0
    assert metrics.exact_match("an answer is", "answer") == 0.0
    assert metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert metrics.token_f1("xyz", "abc") == 0.0 and metrics.token_f1("", "") == 1.0
    assert metrics.contains("It returns the absolute value.", "absolute value") == 1.0
    assert metrics.contains("no", "absolute value") == 0.0


def test_citations_faithfulness_agreement_percentile():
    assert metrics.citations("x [2], y [1] and [2] again [77]") == [2, 1, 77]
    assert metrics.strip_citations("Returns x [1].") == "Returns x ."
    assert metrics.faithfulness("returns the sum [1]", "Return the SUM of values") == pytest.approx(1 / 2)
    assert metrics.faithfulness("", "anything") == 0.0
    assert metrics.agreement(["A b", "a B.", "c"]) == pytest.approx(1 / 3)
    assert metrics.agreement(["only"]) == 1.0
    vals = [0.3, 1.2, 0.1, 5.0, 2.2, 0.9]
    for q in (0, 50, 95, 100):
        assert metrics.percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))


# -- prompt library -----------------------------------------------------------------------------


def _qa(i: int, doc: str) -> QA:
    return QA(question=f"What does f{i} do?", answer=f"It does {i}.", doc_id=doc, id=str(i))


def test_prompt_library_messages_and_few_shot_examples():
    from domainlm.eval.command import library_path
    from domainlm.eval.prompts import load_library, pick_examples

    lib = load_library(library_path(""))
    assert lib.version >= 1 and len(lib.templates) >= 3 and lib.shots
    msgs = lib.messages("direct", "What does x do?")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "What does x do?"}
    pool = [_qa(i, f"d{i % 5}") for i in range(40)]
    shots = pick_examples(pool, 4, seed=3, avoid="d1")
    assert len(shots) == 4 and all(s.doc_id != "d1" for s in shots)
    assert shots == pick_examples(pool, 4, seed=3, avoid="d1")            # seeded
    msgs = lib.messages("qa_format", "Q?", shots)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 4 + ["user"]
    assert msgs[1]["content"] == shots[0].answer and msgs[-1]["content"] == "Question: Q?\nAnswer:"


@pytest.mark.parametrize("text, message", [
    ("version: 1\n", "needs `templates:`"),
    ("templates:\n  a: {system: hi}\n", "template 'a' needs a `user:` message"),
    ("templates:\n  a: {user: 'no placeholder'}\n", "must contain {question}"),
    ("templates:\n  a: {user: '{question} {nope}'}\n", "bad placeholder 'nope'"),
])
def test_bad_prompt_libraries_are_refused(tmp_path, text, message):
    from domainlm.eval.prompts import load_library

    f = tmp_path / "lib.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("(", r"\(")):
        load_library(f)


# -- decontamination ----------------------------------------------------------------------------


def test_thirteen_gram_overlap_is_found_and_short_items_are_matched_whole():
    from domainlm.eval.decontam import build_index, contaminated, summary

    long_answer = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    items = [QA("What is alpha?", long_answer, "a", "1"), QA("What is beta?", "Beta is small.", "b", "2"),
             QA("What is gamma?", "Unseen words entirely here.", "c", "3")]
    source = ["intro text " + " ".join(long_answer.split()[1:]) + " outro",   # 13 consecutive words of item 1
              "we know that Beta is small, indeed"]                                  # item 2's whole answer
    idx = build_index("src", source)
    flags = contaminated(items, idx)
    assert flags["1"] == {"question": False, "answer": True}
    assert flags["2"] == {"question": False, "answer": True}
    assert flags["3"] == {"question": False, "answer": False}
    twelve = build_index("src", ["intro " + " ".join(long_answer.split()[1:13])])   # only 12 words
    assert not contaminated(items, twelve)["1"]["answer"]
    assert summary(flags) == {"items": 3, "question": 0, "answer": 2, "any": 2, "any_share": 2 / 3}
    # a short item matches on word boundaries only: "is small" is in "Beta is small", "is smal" is not
    assert idx.contains("Beta is small") and not idx.contains("eta is small") and not idx.contains("is smal")


# -- generation and perplexity on a tiny model ----------------------------------------------------


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say():
    """bf16 on the CPU (fine-tuning, generation) only with AVX512-BF16 or AMX: an AVX512 CPU
    without them emulates bf16 (3.9x an fp32 matmul), though oneDNN calls it supported."""
    from domainlm.devices import cpu_has_bf16
    from domainlm.eval.generate import torch_dtype

    flags = set(next(x for x in open("/proc/cpuinfo") if x.startswith("flags")).split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_bf16() == native
    assert torch_dtype("bf16", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_batched_generation_equals_one_generate_per_question(tiny_hf_model):
    from transformers import AutoModelForCausalLM

    from domainlm.eval.generate import Generator
    from domainlm.pretrain.convert.hfdir import open_hf_dir, stop_ids

    gen = Generator(tiny_hf_model)
    prompts = [[{"role": "user", "content": q}] for q in
               ["What does os.path.join do?", "Hi", "Explain the numpy dtype argument of zeros in some detail please",
                "What is the signature of json.dumps?", "x"]]
    batched = gen.generate(prompts, max_new_tokens=12, batch_size=4)
    hf = open_hf_dir(tiny_hf_model)
    tok = hf.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model)).eval()
    for p, got in zip(prompts, batched):
        ids = gen.prompt_ids(p)
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=stop_ids(tok), pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        n = next((i + 1 for i, t in enumerate(out) if t in stop_ids(tok)), len(out))
        want = tok.decode([t for t in out[:n] if t not in stop_ids(tok)], skip_special_tokens=True).strip()
        assert got.text == want and got.tokens_in == len(ids) and got.tokens_out == n


def test_generation_with_the_adapter_fused_equals_peft(tiny_hf_model, tmp_path):
    """Generator runs a LoRA adapter's projections through FusedLoraLinear (one addmm): the same
    logits as peft's forward on a left-padded batch, and the same greedy answers."""
    from domainlm.eval.generate import Generator
    from domainlm.finetune.kernels import FusedLoraLinear
    from tests.conftest import lora_model

    adapter = tmp_path / "adapter"
    lora_model(tiny_hf_model, seed=3).save_pretrained(str(adapter))
    fused, plain = (Generator(tiny_hf_model, adapter, fuse_lora=f) for f in (True, False))
    layers = fused.model.get_base_model().config.num_hidden_layers
    assert sum(isinstance(m, FusedLoraLinear) for m in fused.model.modules()) == 7 * layers
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.model.modules())
    prompts = [[{"role": "user", "content": q}] for q in
               ["What does os.path.join do?", "Hi", "Explain the numpy dtype argument of zeros in some detail please",
                "What is the signature of json.dumps?", "x"]]
    encoded = [fused.prompt_ids(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[fused.tok.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.inference_mode():
        a, b = (g.model(input_ids=ids, attention_mask=mask).logits for g in (fused, plain))
        with plain.model.disable_adapter():
            base = plain.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert (a - base).abs().max() > 0.1 * base.abs().max()          # the adapter does act
    got, want = (g.generate(prompts, max_new_tokens=12, batch_size=4) for g in (fused, plain))
    assert [x.text for x in got] == [x.text for x in want] and [x.tokens_out for x in got] == [x.tokens_out for x in want]


def test_perplexity_equals_stock_transformers_loss(tiny_hf_model, pydoc_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli(["eval", "ppl", "--model", tiny_hf_model, "--input", pydoc_corpus / "corpus.jsonl",
                                 "--seq-len", 32, "--max-tokens", 640, "--output", out], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["tokens"] == 640 and r["windows"] == 20 and "perplexity" in stdout
    # reference: the same windows through stock transformers' own loss (mean over labels)
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_model))
    ids = []
    for line in (pydoc_corpus / "corpus.jsonl").read_text().splitlines():
        ids += tok.encode(json.loads(line)["text"], add_special_tokens=False) + [tok.eos_token_id]
        if len(ids) > 641:
            break
    ids = torch.tensor(ids[:641])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model)).eval()
    with torch.no_grad():   # HF shifts the labels itself: each window's 32 next-token losses, averaged
        ref = torch.stack([model(input_ids=ids[i * 32:i * 32 + 33][None], labels=ids[i * 32:i * 32 + 33][None]).loss
                           for i in range(20)]).mean().item()
    assert r["loss"] == pytest.approx(ref, rel=1e-5) and r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_eval_qa_zero_and_few_shot_write_scores_that_recompute(tiny_hf_model, pydoc_corpus, tmp_path, capsys):
    qa = f"{pydoc_corpus / 'qa.jsonl'}"
    code, _, err = run_cli(["eval", "qa", "--model", tiny_hf_model, "--data", f"{qa}:test", "--mode", "few-shot",
                            "--limit", 2, "--output", tmp_path / "mixed", "--prompt.few-shot-data", qa], capsys)
    assert code == 2 and "prompt.few_shot_data" in err and "QA records are the test split" in err, err
    pool = tmp_path / "pool"                # a directory whose test.jsonl has no split field to tell
    pool.mkdir()
    for name, split in (("train.jsonl", "train"), ("test.jsonl", "test")):
        (pool / name).write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "split"}) + "\n"
                                         for x in Path(qa).read_text().splitlines()[:40] if json.loads(x)["split"] == split))
    code, _, err = run_cli(["eval", "qa", "--model", tiny_hf_model, "--data", f"{qa}:test", "--mode", "few-shot",
                            "--limit", 2, "--output", tmp_path / "dir", "--prompt.few-shot-data", pool], capsys)
    assert code == 2 and f"brings in {pool / 'test.jsonl'}, whose name says test split" in err, err
    for mode in ("zero-shot", "few-shot"):
        out = tmp_path / mode
        code, stdout, err = run_cli(["eval", "qa", "--model", tiny_hf_model, "--data", f"{qa}:test", "--mode", mode,
                                     "--limit", 12, "--gen.max-new-tokens", 8, "--output", out,
                                     "--prompt.few-shot-data", f"{qa}:train", "--prompt.shots", 2], capsys)
        assert code == 0, err
        recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        summ = json.loads((out / "summary.json").read_text())
        assert len(recs) == 12 == summ["questions"]
        assert summ["exact_match"] == pytest.approx(np.mean([metrics.exact_match(r["answer"], r["gold"]) for r in recs]))
        assert summ["f1"] == pytest.approx(np.mean([metrics.token_f1(r["answer"], r["gold"]) for r in recs]))
        if mode == "few-shot":
            assert all(len(r["prompt"]) >= 6 for r in recs)         # system + 2 shots x 2 + question
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stage"] == "eval qa" and manifest["summary"]["questions"] == 12
    code, _, err = run_cli(["eval", "qa", "--model", tiny_hf_model, "--data", f"{qa}:test", "--mode", "rag",
                            "--output", tmp_path / "rag"], capsys)
    assert code == 2 and "mode rag needs --index" in err
    code, _, err = run_cli(["eval", "qa", "--model", tiny_hf_model, "--data", f"{qa}:nosuch",
                            "--output", tmp_path / "x"], capsys)
    assert code == 2 and "no record with split 'nosuch' (splits: test, train)" in err


def test_eval_qa_samples_when_asked_with_the_seed_given(tiny_hf_model, pydoc_corpus, tmp_path, capsys):
    """--gen.temperature/--gen.top-p reach the decoding: the answers are what `Generator.generate`
    samples from the same prompts and seed, a rerun gives them again, and greedy ones differ."""
    from domainlm.eval.generate import Generator

    qa = f"{pydoc_corpus / 'qa.jsonl'}:test"
    base = ["eval", "qa", "--model", tiny_hf_model, "--data", qa, "--limit", 6, "--gen.max-new-tokens", 8]
    runs = {}
    for name, extra in (("greedy", []), ("a", ["--gen.temperature", 1.0, "--gen.top-p", 0.9, "--prompt.seed", 3]),
                        ("b", ["--gen.temperature", 1.0, "--gen.top-p", 0.9, "--prompt.seed", 3])):
        code, stdout, err = run_cli([*base, *extra, "--output", tmp_path / name], capsys)
        assert code == 0, err
        runs[name] = [json.loads(x) for x in (tmp_path / name / "results.jsonl").read_text().splitlines()]
    summ = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summ["decoding"] == {"temperature": 1.0, "top_p": 0.9, "seed": 3}
    assert "sampled: temperature 1, top_p 0.9, seed 3" in stdout
    answers = {k: [r["answer"] for r in v] for k, v in runs.items()}
    assert answers["a"] == answers["b"] and answers["a"] != answers["greedy"]
    ref = Generator(str(tiny_hf_model), device="cpu").generate([r["prompt"] for r in runs["a"]], max_new_tokens=8,
                                                              temperature=1.0, top_p=0.9, seed=3)
    assert answers["a"] == [g.text for g in ref]


def test_qa_files_with_missing_fields_are_one_line_errors(tmp_path):
    from domainlm.qa import read_qa

    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q1", "answer": "a1", "doc_id": "d"}\n{"question": "q2"}\n')
    with pytest.raises(UserError, match=r"qa.jsonl:2: no 'answer' field \(fields: question\)"):
        read_qa([str(f)])
    f.write_text('{"question": "q1", "answer": ""}\n')
    with pytest.raises(UserError, match=r"qa.jsonl:1: field 'answer' must be a non-empty string"):
        read_qa([str(f)])
    f.write_text('not json\n')
    with pytest.raises(UserError, match=r"qa.jsonl:1: not valid JSON"):
        read_qa([str(f)])


def test_eval_bad_numbers_and_devices_are_one_line(tiny_hf_model, pydoc_corpus, tmp_path, capsys, monkeypatch):
    """Negative threads or temperature, a CUDA device where there is none: one line, exit 2, nothing written."""
    qa = f"{pydoc_corpus / 'qa.jsonl'}:test"
    base = ["eval", "qa", "--model", tiny_hf_model, "--data", qa, "--limit", 2, "--output", tmp_path / "out"]
    code, _, err = run_cli([*base, "--gen.threads", -1], capsys)
    assert code == 2 and "gen.threads must be >= 0" in err and "got -1" in err and "Traceback" not in err
    code, _, err = run_cli([*base, "--gen.temperature", -1], capsys)
    assert code == 2 and "gen.temperature must be >= 0" in err and "got -1" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli([*base, "--gen.device", "cuda"], capsys)
    assert code == 2 and "--gen.device cuda: no CUDA device here; use --gen.device cpu" in err
    code, _, err = run_cli(["eval", "ppl", "--model", tiny_hf_model, "--input", pydoc_corpus / "corpus.jsonl",
                            "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: no CUDA device here; use --device cpu" in err
    assert not (tmp_path / "out").exists()


def test_eval_ppl_holds_windows_to_the_context_and_names_its_text_field(tokenizer_dir, pydoc_corpus, tmp_path,
                                                                        capsys):
    """--seq-len above max_position_embeddings: the windows are the model's context, said in the
    summary and the JSON; a file without a `text` field names --text-field, which eval ppl takes."""
    from tests.conftest import tiny_llama

    model = tiny_llama(tmp_path / "short", tokenizer_dir, max_position_embeddings=64)
    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli(["eval", "ppl", "--model", model, "--input", pydoc_corpus / "corpus.jsonl",
                                 "--max-tokens", 2000, "--output", out], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["seq_len"] == 64 and r["windows"] == 2000 // 64 and r["tokens"] == 64 * (2000 // 64)
    assert "windows of 64 (the model's context; --seq-len 512 held to it)" in stdout
    code, _, err = run_cli(["eval", "ppl", "--model", model, "--input", pydoc_corpus / "qa.jsonl"], capsys)
    assert code == 2 and "no 'text' field" in err and "--text-field NAME" in err
    code, stdout, err = run_cli(["eval", "ppl", "--model", model, "--input", pydoc_corpus / "qa.jsonl",
                                 "--text-field", "answer", "--seq-len", 32, "--max-tokens", 320], capsys)
    assert code == 0 and "windows of 32" in stdout and "held to it" not in stdout, err
    corpus = tmp_path / "corpus.jsonl"                      # --output over the input, or a directory: refused
    corpus.write_bytes((pydoc_corpus / "corpus.jsonl").read_bytes())
    for bad, needle in ((corpus, "is the input"), (tmp_path, "is a directory")):
        code, _, err = run_cli(["eval", "ppl", "--model", model, "--input", corpus, "--output", bad], capsys)
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert corpus.read_bytes() == (pydoc_corpus / "corpus.jsonl").read_bytes()
    code, _, err = run_cli(["eval", "ppl", "--model", model, "--input", corpus, "--max-tokens", 200,
                            "--output", out], capsys)             # an earlier report is replaced
    assert code == 0, err


def test_prompts_longer_than_the_context_are_counted_with_the_same_answers(tokenizer_dir, pydoc_corpus, tmp_path,
                                                                           capsys):
    """A prompt that does not fit the context keeps its end, as before, and is now counted: per
    answer (truncated), in summary.json, in the summary printed and in a warning."""
    from transformers import AutoModelForCausalLM

    from domainlm.eval.generate import Generator
    from domainlm.pretrain.convert.hfdir import stop_ids
    from tests.conftest import tiny_llama

    model = tiny_llama(tmp_path / "short", tokenizer_dir, max_position_embeddings=64)
    gen = Generator(model)
    prompts = [[{"role": "system", "content": "You answer questions about the Python API documentation. " * 4},
                {"role": "user", "content": "What does os.path.join do?"}],
               [{"role": "user", "content": "Hi"}]]
    got = gen.generate(prompts, max_new_tokens=8, batch_size=2)
    assert [g.truncated for g in got] == [True, False] and got[0].tokens_in == 64 - 8
    stock = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    for p, g in zip(prompts, got):   # the kept tokens are the prompt's last 56, as before the count
        ids = gen.prompt_ids(p)[-(64 - 8):]
        out = stock.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             eos_token_id=stop_ids(gen.tok), pad_token_id=gen.tok.pad_token_id)[0, len(ids):].tolist()
        n = next((i + 1 for i, t in enumerate(out) if t in gen.stops), len(out))
        assert g.text == gen.tok.decode([t for t in out[:n] if t not in gen.stops], skip_special_tokens=True).strip()

    out = tmp_path / "qa"
    code, stdout, err = run_cli(["eval", "qa", "--model", model, "--data", f"{pydoc_corpus / 'qa.jsonl'}:test",
                                 "--mode", "few-shot", "--prompt.few-shot-data", f"{pydoc_corpus / 'qa.jsonl'}:train",
                                 "--prompt.shots", 2, "--limit", 6, "--gen.max-new-tokens", 8, "--output", out], capsys)
    assert code == 0, err
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    summ = json.loads((out / "summary.json").read_text())
    cut = sum(r["truncated"] for r in recs)
    assert cut > 0 and summ["truncated"] == cut
    assert all(r["tokens_in"] == 64 - 8 for r in recs if r["truncated"])
    assert "prompts cut to fit the context" in stdout and f" {cut} (kept their end" in stdout
    assert f"{cut} of 6 prompts (few-shot) are longer than the model's context of 64 tokens" in err


# -- the ecosystem: lm-evaluation-harness ---------------------------------------------------------


def test_hf_dir_and_adapter_evaluate_in_lm_evaluation_harness(tiny_hf_model, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,peft=ADAPTER` on a small local task."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the `eval` extra (make setup installs it)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_hf_model)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(adapter))
    rows = [{"question": f"What does f{i} return?", "choices": [f"value {i}", f"nothing {i}"], "label": i % 2}
            for i in range(8)]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "pydoc_local.yaml").write_text(
        "task: pydoc_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_dir / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={tiny_hf_model},peft={adapter},dtype=float32", "--tasks", "pydoc_local",
                        "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4",
                        "--output_path", str(out)], capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["pydoc_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and results["n-samples"]["pydoc_local"]["effective"] == 8
