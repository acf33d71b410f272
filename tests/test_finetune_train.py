"""`domainlm finetune sft` and `finetune merge` end to end on CPU, through the real CLI.

A tiny random Llama (tests/conftest.py `tiny_llama`) with the session tokenizer and its ChatML
template. References are stock libraries: transformers' generate on the written files,
`PeftModel.from_pretrained` on the adapter dir, the unmerged model's logits for the merge, one
process accumulating gradients for DP=2, an uninterrupted run for a killed-and-resumed one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli, tiny_llama

# peft reads `is_gradient_checkpointing`, which transformers 5 deprecates: a library-version notice.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

COMMON = ["--train.seq-len", "64", "--log.every", "1", "--log.tensorboard", "false", "--eval.batch-size", "32",
          "--eval.new-tokens", "20", "--schedule.warmup-steps", "2"]


def sft(model, data, out, *extra) -> list[str]:
    return ["finetune", "sft", "--model", str(model), "--data", *map(str, data), "--output", str(out), *COMMON,
            *map(str, extra)]


def losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def qa32(tmp_path_factory, pydoc_corpus) -> Path:
    """32 signature questions with short answers, as pydoc's qa.jsonl holds them; one per class or
    module, so that each answer follows from its question (no two ask about siblings)."""
    out = tmp_path_factory.mktemp("qa") / "qa32.jsonl"
    rows = [json.loads(x) for x in (pydoc_corpus / "qa.jsonl").read_text().splitlines()]
    pick, parents = [], set()
    for r in rows:
        parent = r["symbol"].rsplit(".", 1)[0]
        if r["id"].endswith("#signature") and r["split"] == "train" and len(r["answer"]) <= 30 and parent not in parents:
            pick.append(r)
            parents.add(parent)
    pick = pick[:32]
    assert len(pick) == 32
    out.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return out


@pytest.fixture(scope="module")
def bad_records(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    f.write_text("\n".join([
        "{oops",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
        json.dumps({"question": "What?", "answer": ""}),
        json.dumps({"question": "A long one?", "answer": "word " * 200}),           # too_long at seq_len 64
    ]) + "\n")
    return f


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base") / "model", tokenizer_dir)


# -- full fine-tuning until memorised: EOS learned, points, QA, forgetting -------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_dir, qa32, bad_records, pydoc_corpus):
    root = tmp_path_factory.mktemp("full")
    rows = [json.loads(x) for x in qa32.read_text().splitlines()]
    points = root / "points.yaml"
    points.write_text(
        "points:\n"
        "  - name: recites\n"
        f"    examples: [{{question: {json.dumps(rows[0]['question'])}, answer: {json.dumps(rows[0]['answer'])}}}]\n"
        "    tests:\n"
        + "".join(f"      - {{prompt: {json.dumps(r['question'])}, expect: exact, value: {json.dumps(r['answer'])}}}\n"
                  for r in rows[:3])
        # A behaviour the training data undoes (answers that do not open with code): its rate falls.
        + "  - name: prose_first\n"
        "    tests:\n"
        + "".join(f"      - {{prompt: {json.dumps(r['question'])}, expect: regex, value: '^[^`]'}}\n" for r in rows[3:5]))
    out = root / "out"
    args = sft(model_dir, [qa32, bad_records], out, "--method", "full", "--train.max-steps", 90,
               "--train.micro-batch-size", 16, "--train.global-batch-size", 32, "--optim.lr", 1e-2, "--optim.beta2", 0.99,
               "--schedule.style", "constant", "--valid-data", qa32, "--eval.every", 45, "--points", points,
               "--eval.qa", qa32, "--forgetting-data", pydoc_corpus / "corpus.jsonl", "--eval.forgetting-tokens", 2048,
               "--log.tensorboard", "true", "--log.every", 10)
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from domainlm.cli import main

    o, e = StringIO(), StringIO()
    with redirect_stdout(o), redirect_stderr(e):       # module scope: capsys is per test
        code = main([str(a) for a in args])
    return code, o.getvalue(), e.getvalue(), out, rows


def test_eos_learned_answers_reproduced_by_stock_transformers_stop_at_im_end(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err, path, rows = full_run
    assert code == 0, err[-3000:]
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()       # stock: config, safetensors, generation config
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id
    for r in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
        assert gen.tolist() == tok(r["answer"], add_special_tokens=False)["input_ids"] + [end], r["question"]


def test_full_run_counts_checks_and_logs(full_run, qa32, bad_records):
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    code, out, err, path, rows = full_run
    assert code == 0, err[-3000:]
    m = json.loads((path / "manifest.json").read_text())
    assert m["stage"] == "finetune sft" and m["method"] == "full"
    train = m["data"]["train"]
    assert train["records"] == 32 + 5 and train["kept"] == 32 + 1
    assert train["dropped"] == {"invalid_json": 1, "no_assistant_turn": 1, "roles_out_of_order": 1,
                                "empty_content": 1, "too_long": 1}
    assert train["records"] == train["kept"] + sum(v for k, v in train["dropped"].items() if k != "too_long")
    assert train["samples"] == 32 + 1                          # + the point's example
    assert {f["sha256"] for f in train["files"]} >= {__import__("hashlib").sha256(qa32.read_bytes()).hexdigest()}
    dead = [json.loads(x) for x in (path / "dead_letter.jsonl").read_text().splitlines()]
    assert [(d["file"], d["line"], d["reason"]) for d in dead] == [
        (str(bad_records), 1, "invalid_json"), (str(bad_records), 2, "no_assistant_turn"),
        (str(bad_records), 3, "roles_out_of_order"), (str(bad_records), 4, "empty_content")]
    before, after = m["checks"]["before"], m["checks"]["after"]
    assert after["valid_loss"] < 0.1 < before["valid_loss"]
    assert before["qa"]["exact_match"] == 0 and after["qa"]["exact_match"] == 1.0 and after["qa"]["f1"] == 1.0
    assert after["forgetting_ppl"] > 0 and before["forgetting_ppl"] > 0
    pts = m["checks"]["points"]
    assert pts["recites"] == {"before": 0.0, "after": 1.0, "fell": False, "tests": 3}
    assert pts["prose_first"] == {"before": 1.0, "after": 0.0, "fell": True, "tests": 2}
    # The summary: one screen with the checks, a fallen point marked.
    assert "domainlm finetune sft" in out and "FELL" in out and "held-out QA" in out and "forgetting ppl" in out
    assert "point prose_first" in out and "2/2 -> 0/2 passed   FELL" in out
    assert "tok/s" in err and "val loss" in err                                     # progress lines
    recs = [json.loads(x) for x in (path / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [45, 90]
    assert {r["step"] for r in recs if r["kind"] == "train"} == {1, 10, 20, 30, 40, 50, 60, 70, 80, 90}
    assert list((path / "logs/tensorboard").glob("events.out.tfevents.*"))
    hf = open_hf_dir(path)                                                          # the HF dir contract
    assert hf.model_type == "llama" and hf.chat_template and not Path(f"{path}.run").exists()


def test_merge_refuses_a_full_fine_tune(full_run, tmp_path, capsys):
    code, _, err = run_cli(["finetune", "merge", "--adapter", full_run[3], "--output", tmp_path / "m"], capsys)
    assert code == 2 and "full fine-tune" in err and len(err.strip().splitlines()) == 1


# -- LoRA: the adapter dir, peft loading it, merge ----------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir, qa32):
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from domainlm.cli import main

    out = tmp_path_factory.mktemp("lora") / "adapter"
    args = sft(model_dir, [qa32], out, "--train.max-steps", 6, "--train.micro-batch-size", 8,
               "--train.global-batch-size", 16, "--optim.lr", 5e-3, "--valid-fraction", 0.1, "--kernels", "triton")
    o, e = StringIO(), StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = main([str(a) for a in args])
    assert code == 0, e.getvalue()[-3000:]
    return out


def test_adapter_dir_contract(lora_run, model_dir):
    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    ad = open_adapter_dir(lora_run)
    base = open_hf_dir(model_dir)
    assert ad.base_model == str(model_dir) and ad.base_sha256 == base.weights_sha256() and ad.method == "lora"
    ad.check_base(base)
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    m = ad.manifest
    assert m["stage"] == "finetune sft" and m["config"]["method"] == "lora"
    assert m["data"]["valid"]["samples"] > 0 and m["training"]["steps"] == 6
    # --kernels triton where Triton cannot launch (CPU, no interpreter): said, and the torch path ran.
    assert m["kernels"] == {"requested": "triton", "used": None, "recompute_elementwise": False}
    assert 0 < m["parameters"]["trainable_share"] < 0.2
    assert m["inputs"][0]["path"] == str(model_dir)


def test_chat_template_identical_in_training_and_in_the_adapter_dir(lora_run, model_dir):
    from transformers import AutoTokenizer

    trained_with = (model_dir / "chat_template.jinja").read_text()
    assert (lora_run / "chat_template.jinja").read_text() == trained_with
    assert AutoTokenizer.from_pretrained(str(lora_run)).chat_template == trained_with


def test_peft_loads_the_adapter_with_no_warnings(lora_run, model_dir, capfd):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(lora_run))
    # transformers 5 deprecates `is_gradient_checkpointing`, which peft reads on every load, adapter or
    # not: a library-version notice, the only one allowed here.
    ours = [w for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    stderr = capfd.readouterr().err
    assert not [line for line in stderr.splitlines() if "Loading weights" not in line and line.strip()], stderr
    saved = load_file(str(lora_run / "adapter_model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        live = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(state[live], v), k
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())       # trained, not the init


def _logits(model, tok, template, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_merge_equals_unmerged(lora_run, model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domainlm.pretrain.convert.hfdir import open_hf_dir

    out = tmp_path / "merged"
    code, stdout, err = run_cli(["finetune", "merge", "--adapter", lora_run, "--output", out], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    v = m["verification"]
    assert m["stage"] == "finetune merge" and v["passed"] and v["relative_tolerance"] == 1e-4 and v["greedy_identical"]
    assert v["max_abs_diff"] <= 1e-4 * v["max_abs_logit"]
    assert "verification" in stdout and "greedy" in stdout
    # Independently: stock transformers on the merged files vs stock peft on base + adapter.
    tok = AutoTokenizer.from_pretrained(str(out))
    template = (lora_run / "chat_template.jinja").read_text()
    assert tok.chat_template == template
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(lora_run)).eval()
    for prompt in ("What is the signature of `os.path.join`?", "hello"):
        a, b = _logits(merged, tok, template, prompt), _logits(unmerged, tok, template, prompt)
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
    assert open_hf_dir(out).weights_sha256() != open_hf_dir(model_dir).weights_sha256()


def test_merge_onto_another_base_is_refused(lora_run, tokenizer_dir, tmp_path, capsys):
    other = tiny_llama(tmp_path / "other", tokenizer_dir, seed=1)
    out = tmp_path / "merged"
    code, _, err = run_cli(["finetune", "merge", "--adapter", lora_run, "--base", other, "--output", out], capsys)
    assert code == 2 and "was trained on" in err and "has other weights" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_dora_with_rslora_and_a_template_file_trains_and_merges(model_dir, qa32, tmp_path, capsys):
    """DoRA + rsLoRA through peft, on a model dir without a chat template (given by --chat-template)."""
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    template = tmp_path / "chatml.jinja"
    shutil.move(bare / "chat_template.jinja", template)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    out = tmp_path / "dora"
    code, _, err = run_cli(sft(bare, [qa32], out, "--method", "dora", "--lora.rslora", "true", "--train.max-steps", 2,
                               "--train.micro-batch-size", 8, "--train.global-batch-size", 8), capsys)
    assert code == 2 and "has no chat template" in err and "--chat-template" in err and not out.exists()
    code, _, err = run_cli(sft(bare, [qa32], out, "--method", "dora", "--lora.rslora", "true", "--train.max-steps", 2,
                               "--train.micro-batch-size", 8, "--train.global-batch-size", 8,
                               "--chat-template", template), capsys)
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"]
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    code, _, err = run_cli(["finetune", "merge", "--adapter", out, "--output", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "merged/manifest.json").read_text())["verification"]["passed"]


# -- exact resume after a kill; DP=2 equals one process accumulating --------------------------------


def test_kill_then_resume_gives_the_uninterrupted_losses(model_dir, qa32, tmp_path, capsys):
    common = ["--train.max-steps", 24, "--train.micro-batch-size", 4, "--train.global-batch-size", 8,
              "--lora.dropout", 0.1, "--valid-fraction", 0, "--packing", "true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    code, _, err = run_cli(sft(model_dir, [qa32], full, *common), capsys)
    assert code == 0, err
    log = tmp_path / "killed.log"
    proc = subprocess.Popen([sys.executable, "-m", "domainlm.cli", *sft(model_dir, [qa32], killed, *common)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})     # same threads as this process: same sums
    run = Path(f"{killed}.run")
    metrics = run / "logs/metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)        # the step finishes, the state is saved, exit 0
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    stopped_at = int((run / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped_at < 24, "the run finished before the signal landed"
    assert "stopped by SIGTERM" in log.read_text() and not killed.exists()
    code, _, err = run_cli(sft(model_dir, [qa32], killed, *common), capsys)
    assert code == 0, err
    assert f"resumed from step_{stopped_at:07d}" in err
    a, b = losses(full / "logs/metrics.jsonl"), losses(killed / "logs/metrics.jsonl")
    assert sorted(b) == list(range(1, 25))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "adapter_model.safetensors")), load_file(str(killed / "adapter_model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dp2_under_torchrun_equals_one_process_accumulating(method, model_dir, qa32, tokenizer_dir, pydoc_corpus,
                                                             tmp_path, capsys):
    """Two gloo processes (DDP around the adapters; FSDP2 shards for full fine-tuning), each taking
    half of every step, against one process accumulating the same micro-batches."""
    from safetensors.torch import load_file

    from tests.conftest import token_shards

    common = ["--method", method, "--train.max-steps", 4, "--train.micro-batch-size", 2, "--train.global-batch-size", 8,
              "--lora.dropout", 0, "--valid-fraction", 0, "--packing", "true", "--train.device", "cpu"]
    if method == "lora":          # the shards' valid split as forgetting text, tokenizer checked
        shards = token_shards(tmp_path / "shards", tokenizer_dir, pydoc_corpus, train=[4], valid=4)
        common += ["--forgetting-data", shards, "--eval.forgetting-tokens", 512]
    dp2 = tmp_path / "dp2"
    log = tmp_path / "dp2.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "domainlm.cli", *sft(model_dir, [qa32], dp2, *common)],
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    one = tmp_path / "one"
    code, _, err = run_cli(sft(model_dir, [qa32], one, *common), capsys)
    assert code == 0, err
    a, b = losses(one / "logs/metrics.jsonl"), losses(dp2 / "logs/metrics.jsonl")
    assert sorted(b) == [1, 2, 3, 4]
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (one, dp2))
    assert mb["training"]["processes"] == 2 and ma["training"]["processes"] == 1
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(str(one / weights)), load_file(str(dp2 / weights))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    if method == "lora":
        # relative: a perplexity in the thousands (random tiny model) differs in its 7th digit between
        # one and two CPU threads' float32 sums
        pa, pb = ma["checks"]["after"]["forgetting_ppl"], mb["checks"]["after"]["forgetting_ppl"]
        assert pa == pytest.approx(pb, rel=1e-6)


def test_launch_finetune_runs_finetune_sft_on_every_rank(capsys):
    code, out, _ = run_cli(["launch", "finetune", "--cpu", "--gpus-per-node", "2", "--dry-run", "--",
                            "--config", "configs/finetune/pydoc_lora.yaml"], capsys)
    assert code == 0
    assert "--nproc-per-node=2 --standalone -m domainlm.cli finetune sft --config configs/finetune/pydoc_lora.yaml " \
           "--train.device cpu" in out


def test_bench_gpu_mode_dry_run():
    """The GPU benchmark's configs build and validate without a GPU (it runs only where CUDA is)."""
    out = subprocess.run([sys.executable, str(REPO / "bench/finetune.py"), "--gpu", "--dry-run"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GPU plan (dry run, nothing executed): 1B shape bf16, seq 2048" in out.stdout
    assert "kernels=triton" in out.stdout and "method=qlora" in out.stdout


# -- bad input: one line, exit 2, nothing lost ----------------------------------------------------------


def _not_hf(root: Path) -> Path:
    (root / "junk").mkdir()
    (root / "junk/readme.txt").write_text("hello")
    return root / "junk"


def _qwen2(root: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from domainlm.finetune.model import quiet_transformers

    quiet_transformers()        # its "Writing model shards" bar would land in the captured stderr
    d = root / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=128)).save_pretrained(str(d))
    return d


# Mistakes in values, each refused at load time, alone and with its value (none reaches torch).
BAD_VALUES = {
    "beta1": (["--optim.beta1", 2], "optim.beta1 must be in [0, 1), got 2.0"),
    "beta2": (["--optim.beta2", 1], "optim.beta2 must be in [0, 1), got 1.0"),
    "eps": (["--optim.eps", -1], "optim.eps must be > 0, got -1.0"),
    "lr": (["--optim.lr", 0], "optim.lr must be in (0, 1]"),
    "lr_huge": (["--optim.lr", 1e38], "optim.lr must be in (0, 1]"),
    "weight_decay": (["--optim.weight-decay", -1], "optim.weight_decay must be >= 0, got -1.0"),
    "clip_grad": (["--optim.clip-grad", -1], "optim.clip_grad must be >= 0 (0 turns clipping off), got -1.0"),
    "min_lr_ratio": (["--optim.min-lr-ratio", 2], "optim.min_lr_ratio must be in [0, 1], got 2.0"),
    "eval_batch_size": (["--eval.batch-size", 0], "eval.batch_size must be positive, got 0"),
    "keep_last": (["--checkpoint.keep-last", -1], "checkpoint.keep_last must be >= 0, got -1"),
}


@pytest.mark.parametrize("case", ["not_hf", "not_llama", "no_usable_record", "qlora_on_cpu", "output_taken",
                                  "missing_data", "no_usable_valid_record", "template_syntax", "truncated_weights",
                                  "test_split", "missing_points", *sorted(BAD_VALUES)])
def test_bad_input_is_one_line_and_loses_nothing(case, model_dir, qa32, bad_records, tmp_path, capsys, pydoc_corpus):
    model, data, out, extra = model_dir, [qa32], tmp_path / "out", []
    expect = {"not_hf": "has no config.json", "not_llama": "supports Llama-family models",
              "no_usable_record": "no usable training record", "qlora_on_cpu": "method qlora needs a CUDA GPU",
              "output_taken": "already holds something else", "missing_data": "does not exist",
              "no_usable_valid_record": f"no usable validation record in --valid-data {bad_records}: 5 read, dropped: ",
              "template_syntax": f"chat_template: '{tmp_path / 'bad.jinja'}', line 2: Jinja syntax error (",
              "truncated_weights": f"{tmp_path / 'cut/model.safetensors'}: truncated safetensors file",
              "missing_points": f"points '{tmp_path / 'nope.yaml'}': no such file; give a points YAML file",
              "test_split": f"{tmp_path / 'mixed.jsonl'} line 33 is a record of the test split",
              **{k: v[1] for k, v in BAD_VALUES.items()}}[case]
    if case in BAD_VALUES:
        extra = BAD_VALUES[case][0]
    elif case == "no_usable_valid_record":
        extra = ["--valid-data", bad_records]
    elif case == "template_syntax":
        (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
        extra = ["--chat-template", tmp_path / "bad.jinja"]
    elif case == "truncated_weights":
        model = tmp_path / "cut"
        shutil.copytree(model_dir, model)
        os.truncate(model / "model.safetensors", 5000)
    elif case == "not_hf":
        model = _not_hf(tmp_path)
    elif case == "not_llama":
        model = _qwen2(tmp_path)
    elif case == "no_usable_record":
        data = [bad_records]
        extra = ["--train.seq-len", 16]
    elif case == "qlora_on_cpu":
        extra = ["--method", "qlora"]
    elif case == "output_taken":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    elif case == "missing_data":
        data = [tmp_path / "nope.jsonl"]
    elif case == "missing_points":
        extra = ["--points", tmp_path / "nope.yaml"]
    elif case == "test_split":             # a QA file holding both splits, given without :train
        test = next(x for x in (pydoc_corpus / "qa.jsonl").read_text().splitlines() if '"split": "test"' in x)
        (tmp_path / "mixed.jsonl").write_text(qa32.read_text() + test + "\n")
        data = [tmp_path / "mixed.jsonl"]
    code, stdout, err = run_cli(sft(model, data, out, "--train.max-steps", 1, *extra), capsys)
    assert code == 2, err
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if case == "output_taken":
        assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()
    assert not Path(f"{out}.run").exists()


def test_a_failed_setup_does_not_block_the_corrected_rerun(model_dir, qa32, tmp_path, capsys):
    """A mistake found once the run dir is written (here: a module the model does not have) is one
    line, leaves no checkpoint, and the corrected command runs (it is not "another run")."""
    out, run = tmp_path / "out", Path(f"{tmp_path / 'out'}.run")
    code, _, err = run_cli(sft(model_dir, [qa32], out, "--train.max-steps", 1, "--lora.target-modules", "q_prj"), capsys)
    assert code == 2 and "lora: Target modules {'q_prj'} not found" in err, err
    assert "Traceback" not in err and not out.exists() and not list(run.glob("step_*"))
    code, _, err = run_cli(sft(model_dir, [qa32], out, "--train.max-steps", 1), capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and not run.exists()


def test_a_run_dir_with_checkpoints_of_another_run_is_still_refused(model_dir, qa32, tmp_path, capsys):
    out, run = tmp_path / "out", Path(f"{tmp_path / 'out'}.run")
    common = ["--train.max-steps", 2, "--checkpoint.save-every", 1, "--checkpoint.keep-dir", "true"]
    code, _, err = run_cli(sft(model_dir, [qa32], out, *common), capsys)
    assert code == 0, err
    shutil.rmtree(out)
    code, _, err = run_cli(sft(model_dir, [qa32], out, *common, "--optim.lr", 1e-3), capsys)
    assert code == 2 and "holds checkpoints of another run" in err, err
    assert (run / "step_0000001").is_dir() and not out.exists()


def test_merge_of_a_truncated_adapter_is_one_line(lora_run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run, adapter)
    os.truncate(adapter / "adapter_model.safetensors", 1000)
    out = tmp_path / "merged"
    code, _, err = run_cli(["finetune", "merge", "--adapter", adapter, "--output", out], capsys)
    assert code == 2, err
    assert f"{adapter / 'adapter_model.safetensors'}: not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out.exists()
