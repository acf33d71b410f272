"""Continued pretraining of an HF base with its own byte-level BPE tokenizer (tokenizer.json only,
like SmolLM2 or Llama 3): data shard -> convert from-hf -> pretrain --init-from -> convert to-hf.

The base is a tiny random stock `LlamaForCausalLM` with tied embeddings and grouped-query
attention (4 heads, 2 key/value heads); its tokenizer is a byte-level BPE trained here with the
`tokenizers` library (400 tokens, ChatML special tokens and template), saved by transformers.
References: the `tokenizers` library's own encoding, stock webdataset, stock transformers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TRAIN = ["--train.seq-len", "32", "--train.micro-batch-size", "2", "--train.global-batch-size", "4",
         "--train.max-steps", "2", "--schedule.warmup-steps", "0", "--optim.lr", "1e-3", "--optim.min-lr", "1e-4",
         "--eval.every", "0", "--log.every", "1", "--log.tensorboard", "false", "--data.num-workers", "0",
         "--train.device", "cpu"]


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + f". Doc {i}: x = {i * 7}!"
            for i in range(n)]


def bpe_tokenizer(out: Path, docs: list[str]) -> Path:
    """A byte-level BPE (GPT-2 / Llama 3 / SmolLM2 style) HF tokenizer dir: tokenizer.json only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(str(out))
    assert not (out / "tokenizer.model").exists()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(HF base dir, corpus.jsonl, the corpus's texts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cpt")
    docs = _documents(80)
    model_dir = bpe_tokenizer(root / "base", docs)
    vocab = json.loads((model_dir / "tokenizer.json").read_text())
    n = len(vocab["model"]["vocab"])
    assert n == 400
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=n, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=100000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.2))
    model.save_pretrained(str(model_dir))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    return model_dir, corpus, docs


def test_cpt_of_an_hf_base_with_its_own_bpe_tokenizer(base, tmp_path, capsys):
    import webdataset as wds
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.loader import TokenWindowLoader
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    model_dir, corpus, docs = base
    ref_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = ref_tok.token_to_id("<|im_end|>")

    # 1. convert: the checkpoint dir with an HF-kind tokenizer/ that pretraining can use
    back = tmp_path / "base_megatron"
    code, out, err = run_cli(["convert", "from-hf", "--model", model_dir, "--output", back], capsys)
    assert code == 0, err
    assert "HF tokenizer.json (tokenizers library): shards and pretraining can use it" in out
    m = json.loads((back / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["pretrainable"] and m["tokenizer"]["eos_id"] == eos
    assert m["tokenizer"]["hf_parity"]["id_mismatches"] == 0 and m["verification"]["passed"]
    assert m["model"]["tie_embeddings"] and m["model"]["num_query_groups"] == 2
    tok = load_tokenizer_dir(back / "tokenizer")
    assert tok.kind == "hf" and (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (400, eos, 1, 0)
    assert tok.identity == load_tokenizer_dir(model_dir).identity      # the HF model dir itself: the same tokenizer

    # 2. shards with that tokenizer; stock webdataset reads them; each document is the tokenizers
    # library's encoding of its text (no special tokens: the loader puts the eos between documents)
    shards = tmp_path / "base_shards"
    code, _, err = run_cli(["data", "shard", "--input", corpus, "--tokenizer", back / "tokenizer", "--output", shards,
                            "--valid-fraction", "0.1", "--beam.direct-num-workers", "1"], capsys)
    assert code == 0, err
    sm = json.loads((shards / "manifest.json").read_text())
    assert sm["tokenizer"]["sha256"] == tok.sha256 and sm["tokenizer"]["kind"] == "hf"
    assert sm["tokenizer"]["eos_id"] == eos and sm["token_dtype"] == "uint16"
    assert sm["counts"]["kept"] == len(docs) and not any(sm["dropped"].values())
    urls = [str(shards / s["name"]) for split in ("train", "valid") for s in sm["splits"][split]["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        seen[sample["json"]["id"]] = sample["npy"].tolist()
    expected = {f"d{i}": e.ids for i, e in enumerate(ref_tok.encode_batch(docs, add_special_tokens=False))}
    assert seen == expected

    # 3. pretrain --init-from the converted base (config.yaml sets model, tokenizer, init_from), 2 steps
    run = tmp_path / "cpt"
    code, _, err = run_cli(["pretrain", "--config", back / "config.yaml", "--data.shards", shards,
                            "--checkpoint.dir", run, *TRAIN], capsys)
    assert code == 0, err
    logged = [json.loads(x) for x in (run / "logs/metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    # The same global batch through the HF model gives the first step's loss.
    cfg = load_config(PretrainConfig, back / "config.yaml", {"data.shards": [str(shards)], "data.num_workers": "0"})
    loader = iter(TokenWindowLoader(cfg.data, split="train", seq_len=32, micro_batch_size=2, dp_rank=0, dp_size=1,
                                    vocab_size=400, tokenizer_sha256=tok.sha256, infinite=True))
    batch = torch.cat([next(loader), next(loader)])
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 400), batch[:, 1:].reshape(-1)).item()
    assert abs(train[0]["loss"] - ref) <= 1e-5, (train[0]["loss"], ref)
    # The batch is the documents' ids with the eos between them: every segment between two eos is a document.
    stream = torch.cat([batch[0]] + [w[1:] for w in batch[1:]]).tolist()   # consecutive windows share a token
    cuts = [i for i, t in enumerate(stream) if t == eos]
    assert len(cuts) >= 2
    whole = [stream[a + 1:b] for a, b in zip(cuts, cuts[1:])]
    assert whole and all(seg in expected.values() for seg in whole)
    rm = json.loads((run / "manifest.json").read_text())
    assert rm["tokenizer"]["sha256"] == tok.sha256 and rm["tokenizer"]["kind"] == "hf"
    assert load_tokenizer_dir(run / "tokenizer").identity == tok.identity

    # 4. back to HF: verified against the megatron model (logits within fp32 1e-4), the tokenizer intact
    hf_out = tmp_path / "cpt_hf"
    code, _, err = run_cli(["convert", "to-hf", "--checkpoint", run, "--output", hf_out], capsys)
    assert code == 0, err
    v = json.loads((hf_out / "manifest.json").read_text())["verification"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 * v["max_abs_logit"] and v["greedy_identical"]
    assert (hf_out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    hcfg = json.loads((hf_out / "config.json").read_text())
    assert hcfg["tie_word_embeddings"] and hcfg["vocab_size"] == 400 and hcfg["num_key_value_heads"] == 2
    # trained at 32 tokens, the export keeps the base's 128-token context (RoPE has no learned rows)
    assert hcfg["max_position_embeddings"] == 128
    assert load_tokenizer_dir(hf_out).identity == tok.identity

    # compare's cost of a cpt+... row counts the CPT run: its seconds summed from the logged throughput
    from domainlm.eval.compare import pretraining_cost
    from domainlm.pretrain.checkpoint import open_checkpoint_dir

    logged = [r for r in open_checkpoint_dir(run).metrics() if r.get("kind") == "train"]
    cost = pretraining_cost(str(hf_out))
    assert cost is not None and cost["tokens"] == logged[-1]["tokens"]
    want = sum((b["tokens"] - a) / b["tokens_per_s"] for a, b in zip([0] + [r["tokens"] for r in logged], logged))
    assert cost["seconds"] == pytest.approx(want) and cost["seconds"] > 0
    assert pretraining_cost(str(model_dir)) is None                    # an HF dir no pretraining made


def test_refusals_are_one_line(base, tmp_path, capsys):
    from domainlm.tokenizer.tokdir import load_tokenizer_dir
    from tests.test_loader import make_shards

    model_dir, corpus, _ = base
    # a tokenizer dir with neither tokenizer.model nor tokenizer.json
    empty = tmp_path / "notok"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    code, _, err = run_cli(["data", "shard", "--input", corpus, "--tokenizer", empty, "--output", tmp_path / "s"],
                           capsys)
    assert code == 2 and "is not a tokenizer directory" in err and "tokenizer.json" in err and str(empty) in err
    assert len([x for x in err.splitlines() if "error:" in x]) == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()
    # an eos that is not in the vocab
    bad = tmp_path / "badeos"
    bad.mkdir()
    (bad / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    code, _, err = run_cli(["data", "shard", "--input", corpus, "--tokenizer", bad, "--output", tmp_path / "s"],
                           capsys)
    assert code == 2 and "eos_token '</s>' is not in tokenizer.json" in err, err
    back = tmp_path / "back"
    assert run_cli(["convert", "from-hf", "--model", model_dir, "--output", back, "--no-verify"], capsys)[0] == 0
    tok = load_tokenizer_dir(back / "tokenizer")
    # shards of another tokenizer: refused before any compute, naming the shards dir and the fix
    other = make_shards(tmp_path / "other", {"train": [[np.arange(1, 50)]]}, vocab_size=400, sha="0" * 64)
    code, _, err = run_cli(["pretrain", "--config", back / "config.yaml", "--data.shards", other,
                            "--checkpoint.dir", tmp_path / "run", *TRAIN], capsys)
    assert code == 2 and f"data.shards {str(other)!r}: built with another tokenizer" in err, err
    assert f"than tokenizer {str(back / 'tokenizer')!r} ({tok.identity})" in err and "reshard" in err
    assert len([x for x in err.splitlines() if "error:" in x]) == 1 and not (tmp_path / "run").exists()
    # a tokenizer.json edited after the import
    changed = json.loads((back / "tokenizer/tokenizer.json").read_text())
    changed["model"]["merges"] = changed["model"]["merges"][:-1]   # a merge less: other ids for some text
    (back / "tokenizer/tokenizer.json").write_text(json.dumps(changed))
    code, _, err = run_cli(["data", "shard", "--input", corpus, "--tokenizer", back / "tokenizer",
                            "--output", tmp_path / "s"], capsys)
    assert code == 2 and "does not match" in err and "tokenizer.json" in err, err
