"""`finetune dpo` and `eval pairs` on CPU: the loss against TRL's, log 2 at step 0, the margin
raised on held-out pairs, exact resume, dead letters by reason, one-line refusals.

A tiny random Llama (tests/conftest.py `tiny_llama`) with the session tokenizer and its ChatML
template. References: TRL's `DPOTrainer._compute_loss` on the same batch, log 2 (policy =
reference), the held-out pairs before training, an uninterrupted run for a stopped-and-resumed one.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

COMMON = ["--train.seq-len", "96", "--log.every", "1", "--log.tensorboard", "false", "--eval.batch-size", "32",
          "--schedule.warmup-steps", "1", "--train.precision", "fp32"]


def main(args) -> tuple[int, str, str]:
    from domainlm.cli import main as cli

    o, e = StringIO(), StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = cli([str(a) for a in args])
    return code, o.getvalue(), e.getvalue()


def metrics(path: Path, kind: str = "train") -> dict[int, dict]:
    out = {}
    for line in (path / "logs/metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec
    return out


@pytest.fixture(scope="module")
def qa(pydoc_corpus) -> list[dict]:
    """Signature questions with short answers, one per parent symbol."""
    rows = [json.loads(x) for x in (pydoc_corpus / "qa.jsonl").read_text().splitlines()]
    pick, parents = [], set()
    for r in rows:
        parent = r["symbol"].rsplit(".", 1)[0]
        if (r["id"].endswith("#signature") and r["split"] == "train" and len(r["answer"]) <= 30 and parent not in parents
                and "(" in r["answer"] and "*args" not in r["answer"]):
            pick.append(r)
            parents.add(parent)
    assert len(pick) >= 40
    return pick[:40]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, qa) -> Path:
    """40 pairs (chosen: the signature, rejected: the same call with `*args, **kwargs`, the usual
    hallucination), one of them in TRL's conversational form, plus 4 bad records."""
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = []
    for i, r in enumerate(qa):
        other = r["answer"].split("(", 1)[0] + "(*args, **kwargs)`"
        if i == 0:
            lines.append({"prompt": [{"role": "user", "content": r["question"]}],
                          "chosen": [{"role": "assistant", "content": r["answer"]}],
                          "rejected": [{"role": "assistant", "content": other}]})
        else:
            lines.append({"prompt": r["question"], "chosen": r["answer"], "rejected": other})
    text = "".join(json.dumps(x) + "\n" for x in lines)
    text += "{oops\n"
    text += json.dumps({"prompt": "q?", "chosen": "a"}) + "\n"                           # missing_field
    text += json.dumps({"messages": [{"role": "user", "content": "q?"}], "chosen": "same", "rejected": " same "}) + "\n"
    text += json.dumps({"prompt": "q?", "chosen": "", "rejected": "b"}) + "\n"            # empty_content
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, model_dir, qa) -> Path:
    """A LoRA SFT adapter with non-zero B (so a reference of the base alone would differ from it)."""
    data = tmp_path_factory.mktemp("sft") / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in qa))
    out = data.parent / "adapter"
    code, _, err = main(["finetune", "sft", "--model", model_dir, "--data", data, "--output", out, *COMMON,
                         "--train.max-steps", 4, "--train.micro-batch-size", 8, "--train.global-batch-size", 8,
                         "--optim.lr", 5e-3, "--valid-fraction", 0])
    assert code == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, model_dir, sft_adapter, pairs_file):
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    code, stdout, err = main(["finetune", "dpo", "--model", model_dir, "--adapter", sft_adapter, "--data", pairs_file,
                              "--output", out, *COMMON, "--train.max-steps", 50, "--train.micro-batch-size", 4,
                              "--train.global-batch-size", 8, "--optim.lr", 2e-3, "--valid-fraction", 0.2,
                              "--schedule.style", "constant"])
    return code, stdout, err, out


def test_dpo_starts_at_log2_and_raises_the_margin_on_held_out_pairs(dpo_run):
    code, out, err, path = dpo_run
    assert code == 0, err[-3000:]
    steps = metrics(path)
    # Step 1's loss is computed before any update: policy = reference (the SFT adapter as it starts).
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[1]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert sum(steps[s]["loss"] for s in range(46, 51)) / 5 < 0.5
    m = json.loads((path / "manifest.json").read_text())
    before, after = m["checks"]["before"]["pairs"], m["checks"]["after"]["pairs"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5) and before["margin"] == pytest.approx(0, abs=1e-4)
    # 50 steps raise the chosen-minus-rejected log-probability margin on pairs never trained on.
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    assert after["accuracy"] >= 0.6 and after["margin"] > 0.05 and after["loss"] < before["loss"]
    assert m["stage"] == "finetune dpo"
    assert "held-out pairs" in out and "reward margin 0.000 ->" in out and "margin" in err and "acc" in err


def test_dpo_counts_dead_letters_and_writes_a_peft_adapter_over_the_base(dpo_run, pairs_file, sft_adapter, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    code, _, err, path = dpo_run
    assert code == 0, err[-3000:]
    m = json.loads((path / "manifest.json").read_text())
    train = m["data"]["train"]
    assert train["records"] == 44 and train["by_format"] == {"prompt": 40}        # kept records
    assert train["dropped"] == {"chosen_equals_rejected": 1, "empty_content": 1, "invalid_json": 1,
                                "missing_field": 1}
    assert train["pairs"] + m["data"]["valid"]["pairs"] == 40 and m["data"]["valid"]["pairs"] >= 4
    dead = [json.loads(x) for x in (path / "dead_letter.jsonl").read_text().splitlines()]
    assert [(d["line"], d["reason"]) for d in dead] == [(41, "invalid_json"), (42, "missing_field"),
                                                        (43, "chosen_equals_rejected"), (44, "empty_content")]
    assert m["dpo"]["start_adapter"]["path"] == str(sft_adapter) and m["dpo"]["loss"] == "sigmoid"
    ad = open_adapter_dir(path)
    ad.check_base(open_hf_dir(model_dir))
    assert ad.chat_template == open_adapter_dir(sft_adapter).chat_template
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft = PeftModel.from_pretrained(base, str(path))
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(sft_adapter))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert not torch.allclose(peft(ids).logits, start(ids).logits, atol=1e-4)     # trained on from the SFT adapter


def test_dpo_loss_equals_trl_on_the_same_batch(model_dir):
    """Our loss (LossModel per row + preference_loss) against TRL's DPOTrainer on one batch, for
    a policy that differs from the reference: sigmoid within 1e-5, IPO within 1e-5 relative."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig, DPOTrainer as TRLTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from domainlm.finetune.batches import collate
    from domainlm.finetune.chat import IGNORE, ChatEncoder, Encoded
    from domainlm.finetune.dpo import preference_loss, supervised_per_row
    from domainlm.finetune.model import LossModel

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ref = copy.deepcopy(policy)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = ChatEncoder(tok, (model_dir / "chat_template.jinja").read_text())
    pairs = [("What does `os.path.join` do?", "Join two or more pathname components.", "Return the name."),
             ("What is the signature of `json.dumps`?", "`json.dumps(obj, *, skipkeys=False)`", "`json.dumps(x)`"),
             ("Explain `numpy.zeros`.", "Return a new array of given shape filled with zeros.", "No idea.")]
    chosen = enc.encode_many([[{"role": "user", "content": q}, {"role": "assistant", "content": c}] for q, c, _ in pairs])
    rejected = enc.encode_many([[{"role": "user", "content": q}, {"role": "assistant", "content": r}] for q, _, r in pairs])
    examples, rows = [], []
    for side in (chosen, rejected):
        for e in side:
            sup = [i for i, x in enumerate(e.labels) if x != IGNORE]
            assert sup == list(range(sup[0], sup[-1] + 1))          # one contiguous reply
            rows.append(Encoded(e.ids[:sup[-1] + 1], e.labels[:sup[-1] + 1]))
    for c, r in zip(rows[:3], rows[3:]):
        p = next(i for i, x in enumerate(c.labels) if x != IGNORE)
        assert c.ids[:p] == r.ids[:p]
        examples.append({"prompt_ids": c.ids[:p], "chosen_ids": c.ids[p:], "rejected_ids": r.ids[p:]})
    mb = collate([[e] for e in rows], tok.pad_token_id, packed=False)
    with torch.no_grad():
        ours_logps = -LossModel(policy)(mb.input_ids, mb.labels, mb.attention_mask, per_row=True)
        ref_logps = -LossModel(ref)(mb.input_ids, mb.labels, mb.attention_mask, per_row=True)
    n = supervised_per_row(mb.labels)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    data = Dataset.from_list([{"prompt": q, "chosen": c, "rejected": r} for q, c, r in pairs])
    for loss in ("sigmoid", "ipo"):
        args = TRLConfig(output_dir=tempfile.mkdtemp(), beta=0.1, loss_type=[loss], report_to=[], use_cpu=True,
                         bf16=False)
        trainer = TRLTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
        trainer.model.eval()
        with torch.no_grad():
            theirs = float(trainer._compute_loss(trainer.model, batch, False))
        per, rc, rr = preference_loss(ours_logps[:3], ours_logps[3:], ref_logps[:3], ref_logps[3:], beta=0.1,
                                      loss=loss, chosen_tokens=n[:3], rejected_tokens=n[3:])
        ours = float(per.mean())
        assert abs(ours - math.log(2)) > 1e-3                      # the policy is not the reference
        if loss == "sigmoid":
            assert ours == pytest.approx(theirs, abs=1e-5)
        else:
            assert ours == pytest.approx(theirs, rel=1e-5)


def test_dpo_resumes_exactly(tmp_path, model_dir, sft_adapter, pairs_file):
    """Stopped after step 3 (state saved as on SIGTERM) and rerun: the losses of steps 4-6 equal an
    uninterrupted run's, the reference recomputed from the start adapter as built."""
    from domainlm.config import load_config
    from domainlm.finetune.config import DPOConfig
    from domainlm.finetune.dpo import DPOTrainer

    def cfg(out: Path) -> DPOConfig:
        return load_config(DPOConfig, None, {
            "model": str(model_dir), "adapter": str(sft_adapter), "data": [str(pairs_file)], "output": str(out),
            "train": {"seq_len": 96, "micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6,
                      "precision": "fp32"}, "optim": {"lr": 2e-3}, "log": {"every": 1, "tensorboard": False},
            "valid_fraction": 0.2})

    def run(out: Path, stop_at: int | None) -> list[dict]:
        t = DPOTrainer(cfg(out))
        try:
            t.setup()
            if stop_at is not None:
                t._stop_requested = lambda: t.step == stop_at              # as a SIGTERM after that step
            done = t.train()
            if done:
                t.finish()
            return t.history
        finally:
            t.close()

    with redirect_stderr(StringIO()), redirect_stdout(StringIO()):
        whole = run(tmp_path / "a", None)
        first = run(tmp_path / "b", 3)
        assert [h["step"] for h in first] == [1, 2, 3] and (tmp_path / "b.run" / "latest").is_file()
        rest = run(tmp_path / "b", None)
    assert [h["step"] for h in rest] == [4, 5, 6]
    for a, b in zip(whole, first + rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["margin"] == pytest.approx(b["margin"], rel=1e-5, abs=1e-7)


def test_dpo_refusals_are_one_line(tmp_path, capsys, model_dir, sft_adapter, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n" + "{x\n")
    code, _, err = run_cli(["finetune", "dpo", "--model", model_dir, "--data", bad, "--output", tmp_path / "o", *COMMON],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no usable preference pair" in err and "chosen_equals_rejected 1" in err and "invalid_json 1" in err
    assert not (tmp_path / "o").exists()
    other = tiny_llama(tmp_path / "other", tokenizer_dir, seed=1)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    code, _, err = run_cli(["finetune", "dpo", "--model", other, "--adapter", sft_adapter, "--data", good,
                            "--output", tmp_path / "o2", *COMMON], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "other weights" in err
    assert not (tmp_path / "o2").exists()
    code, _, err = run_cli(["finetune", "dpo", "--model", model_dir, "--data", good, "--output", tmp_path / "o3",
                            "--packing", "true", *COMMON], capsys)
    assert code == 2 and "packing" in err and len(err.strip().splitlines()) == 1


def test_choose_prefers_the_greedy_failure():
    from domainlm.eval.pairs import choose
    from domainlm.qa import QA

    qa = QA(id="x", question="q?", answer="Join path components.", doc_id="x")
    pair, why = choose(qa, ["Return the name.", "Join path components.", "Nothing."], qa.answer, 0.5)
    assert why == "pair" and pair["rejected"] == "Return the name." and pair["rejected_from"] == "greedy"
    pair, why = choose(qa, ["Join path components.", "Join the path.", "Nothing at all."], qa.answer, 0.5)
    assert pair["rejected"] == "Nothing at all." and pair["rejected_from"] == "sample 2" and pair["rejected_f1"] == 0
    assert choose(qa, ["Join path components!", "join path components"], qa.answer, 0.5) == (None, "all_right")


def test_eval_pairs_from_an_adapter(tmp_path, capsys, model_dir, sft_adapter, qa):
    data = tmp_path / "qa.jsonl"
    # the 9th question is longer than the model's context (512): answered from its end, and counted
    long = {**qa[8], "question": "Which of these words " + "again " * 600 + "is it?"}
    data.write_text("".join(json.dumps({**r}) + "\n" for r in [*qa[:8], long]))
    out = tmp_path / "pairs"
    code, stdout, err = run_cli(["eval", "pairs", "--model", model_dir, "--adapter", sft_adapter, "--data",
                                 f"{data}:train", "--output", out, "--samples", 1, "--gen.max-new-tokens", 12], capsys)
    assert code == 0, err[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert c["questions"] == 9 and c["answers"] == 18 and c["pairs"] == len(rows) > 0
    assert c["pairs"] + c["all_right"] + c["no_wrong_answer"] + c["rejected_equals_chosen"] == 9
    assert c["prompts_cut_to_context"] == 1 and "prompts cut to fit the context  1 (" in " ".join(stdout.split("│"))
    assert "1 of 9 prompts are longer than the model's context of 512 tokens" in err
    for r in rows:
        assert r["messages"][-1]["role"] == "user" and r["chosen"] == r["gold"] and r["rejected"] != r["chosen"]
        assert r["rejected_f1"] < 0.5
    assert "pairs" in stdout and "next" in stdout
    # The pairs file is finetune dpo's input as it is.
    from domainlm.finetune.pairs import to_pair

    assert all(to_pair(r, "x")[0].chosen == r["chosen"] for r in rows)


def test_compare_counts_sft_pairs_and_dpo_in_the_training_cost(tmp_path):
    """The sft+dpo row's training time is the SFT adapter's + generating the pairs + DPO, read from
    the three manifests; the table shows the parts."""
    from domainlm.eval.compare import preference_cost
    from domainlm.eval.table import _cells

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "pairs.jsonl").write_text("{}\n")
    (pairs / "manifest.json").write_text(json.dumps({"stage": "eval pairs", "seconds": 40.5}))
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "manifest.json").write_text(json.dumps({
        "stage": "finetune dpo", "training": {"seconds": 60.0, "tokens": 1000, "steps": 14},
        "inputs": [{"path": str(tmp_path / "base")}, {"path": str(pairs / "pairs.jsonl")}],
        "dpo": {"start_adapter": {"path": "x", "training_seconds": 70.25, "tokens": 5000}}}))
    cost = preference_cost(str(dpo))
    assert cost["parts"] == {"SFT": 70.25, "pairs": 40.5, "DPO": 60.0}
    assert cost["train_seconds"] == pytest.approx(170.75) and cost["tokens"] == 6000
    row = {"training": cost}
    cells = _cells("sft+dpo", row, {"approaches": {"sft+dpo": row}})
    assert "171 s (SFT 70 s + pairs 40 s + DPO 60 s), 6,000 tok" in cells


def test_full_dpo_writes_an_hf_dir(tmp_path, model_dir, pairs_file):
    """--method full: every weight trained, the reference the model as given (its log-probabilities
    precomputed, no frozen copy held), an HF dir out."""
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    out = tmp_path / "full"
    code, _, err = main(["finetune", "dpo", "--model", model_dir, "--data", pairs_file, "--output", out, *COMMON,
                         "--method", "full", "--train.max-steps", 4, "--train.micro-batch-size", 4,
                         "--train.global-batch-size", 8, "--optim.lr", 1e-3, "--loss", "ipo", "--beta", 0.5])
    assert code == 0, err[-3000:]
    steps = metrics(out)
    assert steps[1]["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-5)       # IPO at policy = reference
    assert steps[4]["loss"] < steps[1]["loss"]
    hf = open_hf_dir(out)
    assert hf.model_type == "llama" and hf.weights_sha256() != open_hf_dir(model_dir).weights_sha256()
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "full" and m["dpo"] == {**m["dpo"], "loss": "ipo", "beta": 0.5, "start_adapter": None}


def test_eval_pairs_refusals_are_one_line(tmp_path, capsys, model_dir, sft_adapter, pydoc_corpus, pydoc_index):
    """The test split, and a sources budget the model's context cannot hold (refused before the
    model loads): one line, exit 2, nothing written."""
    base = ["eval", "pairs", "--model", model_dir, "--adapter", sft_adapter]
    code, _, err = run_cli(base + ["--data", f"{pydoc_corpus / 'qa.jsonl'}:test", "--output", tmp_path / "a"], capsys)
    assert code == 2 and "test split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(base + ["--data", pydoc_corpus / "qa.jsonl", "--output", tmp_path / "a"], capsys)
    assert code == 2 and " of the " in err and "QA records are the test split" in err and "FILE:train" in err
    index, _ = pydoc_index
    code, _, err = run_cli(base + ["--data", f"{pydoc_corpus / 'qa.jsonl'}:train", "--index", index,
                                   "--rag.max-source-tokens", 4096, "--output", tmp_path / "b"], capsys)
    assert code == 2 and "max_source_tokens" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
