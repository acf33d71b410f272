"""`domainlm convert to-hf / from-hf` on CPU against stock transformers.

Checkpoints come from the real trainer (`domainlm pretrain`, one step at learning rate 0, so the
weights are megatron's own init and a TP=2 run holds exactly the TP=1 weights); init_std 0.3 gives
logits of a few units, so the parity checks compare numbers that matter. The tiny model has 4
query heads in 2 groups, so the grouped QKV interleave is exercised, and its 4096-token vocab is
padded to 4224 rows (make_vocab_size_divisible_by 384), so the export has padding to remove.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli, token_shards

MODEL = ["--model.size", "tiny", "--model.init-std", "0.3", "--model.make-vocab-size-divisible-by", "384"]
TRAIN = ["--train.seq-len", "32", "--train.micro-batch-size", "2", "--train.global-batch-size", "4",
         "--train.max-steps", "1", "--schedule.warmup-steps", "0", "--optim.lr", "0", "--optim.min-lr", "0",
         "--eval.every", "0", "--log.every", "1", "--log.tensorboard", "false", "--data.num-workers", "0",
         "--train.device", "cpu"]
PRETRAIN = MODEL + TRAIN


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir, pydoc_corpus) -> Path:
    return token_shards(tmp_path_factory.mktemp("shards") / "shards", tokenizer_dir, pydoc_corpus,
                        train=[100], valid=20)


def pretrain_args(tokenizer_dir, shards, ckpt, *extra) -> list[str]:
    return ["pretrain", "--tokenizer", str(tokenizer_dir), "--data.shards", str(shards),
            "--checkpoint.dir", str(ckpt), *PRETRAIN, *map(str, extra)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir, shards) -> Path:
    """An untied tiny checkpoint of `domainlm pretrain` (TP=1)."""
    out = tmp_path_factory.mktemp("ck") / "untied"
    code = _pretrain(pretrain_args(tokenizer_dir, shards, out))
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ckpt_tied(tmp_path_factory, tokenizer_dir, shards) -> Path:
    out = tmp_path_factory.mktemp("ck") / "tied"
    assert _pretrain(pretrain_args(tokenizer_dir, shards, out, "--model.tie-embeddings", "true")) == 0
    return out


def _pretrain(args: list[str]) -> int:
    from domainlm.cli import main

    return main(args)


def convert(capsys, *args) -> tuple[int, str, str]:
    return run_cli(["convert", *map(str, args)], capsys)


# -- helpers: the megatron side, HF weights --------------------------------------------------------


def megatron_state(ckpt: Path, step: int | None = None) -> tuple[dict[str, torch.Tensor], object]:
    """The TP=1 state dict of a checkpoint dir (loaded by megatron's dist_checkpointing)."""
    from domainlm.pretrain.convert import megatron as meg

    info = meg.read_checkpoint_dir(str(ckpt), step)
    with meg.single_process():
        model = meg.build(info.model, info.padded_vocab, info.seq_len)
        meg.load_weights(model, info)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return sd, info


def megatron_logits(ckpt: Path, batches: list[list[int]]) -> torch.Tensor:
    from domainlm.pretrain.convert import megatron as meg

    info = meg.read_checkpoint_dir(str(ckpt), None)
    with meg.single_process():
        model = meg.build(info.model, info.padded_vocab, info.seq_len)
        meg.load_weights(model, info)
        return torch.stack([meg.logits(model, ids, info.vocab) for ids in batches])


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


class Captured(logging.Handler):
    """Every warning transformers logs (its loading report of missing / unexpected weights)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def load_hf(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Captured() as cap:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(str(path))
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert cap.records == [], cap.records
    return model.eval(), tok


def no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


TOKENS = [[5, 17, 300, 2999, 42, 7, 1000, 4095, 12, 64, 128, 256], [1, 2, 3, 4, 100, 200, 3000, 3500, 9, 8, 7, 6]]


# -- Megatron -> HF ----------------------------------------------------------------------------------


def test_export_loads_in_transformers_with_matching_logits_and_generates(ckpt, tmp_path, capsys, tokenizer_dir):
    out = tmp_path / "hf"
    code, stdout, err = convert(capsys, "to-hf", "--checkpoint", ckpt, "--output", out)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md", "manifest.json"):
        assert f in names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 4096   # 4224 padded rows cut
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 10000
    assert cfg["torch_dtype"] == "float32"                                               # 'auto': as stored
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 5] and gen["bos_token_id"] == 1 and gen["pad_token_id"] == 3  # eos, <|im_end|>

    model, tok = load_hf(out)
    assert "lm_head.weight" in hf_weights(out)
    # fp32 logits of stock transformers and of the megatron model agree.
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits
    ours = megatron_logits(ckpt, TOKENS)
    assert ours.abs().max() > 2.0                                  # logits of a few units, not ~0
    assert (ours - theirs).abs().max() <= 1e-4
    # generate works, the chat template came along.
    ids = tok("The json module", return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, ids["input_ids"].shape[1]:]
    assert len(new) == 8
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The conversion's own verification: recorded, and printed with the samples.
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["greedy_identical"] and v["max_abs_logit"] > 2.0
    assert all(len(r["hf_ids"]) > 0 for r in v["prompts"])
    assert "greedy 32 tokens identical on 3/3 prompts" in stdout
    assert "sample 'The main idea of this do'" in stdout       # the defaults name no domain (cut to 24)
    card = (out / "README.md").read_text()
    assert "steps: 1 (of 1 planned), 128 tokens" in card and "train: 100 documents" in card
    assert "SentencePiece bpe with 4,096 tokens" in card and "greedy 32-token continuations identical: True" in card


def test_round_trip_megatron_hf_megatron_is_bitwise(ckpt, tmp_path, capsys):
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert convert(capsys, "to-hf", "--checkpoint", ckpt, "--output", hf, "--no-verify")[0] == 0
    code, _, err = convert(capsys, "from-hf", "--model", hf, "--output", back)
    assert code == 0, err
    a, info_a = megatron_state(ckpt)
    b, info_b = megatron_state(back)
    assert (info_a.padded_vocab, info_b.padded_vocab) == (4224, 4096)   # padding rows dropped by the export
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = (a[k][:4096], b[k]) if a[k].shape != b[k].shape else (a[k], b[k])
        assert torch.equal(x, y), k
    # And back again: the same HF tensors, bit for bit.
    again = tmp_path / "again"
    assert convert(capsys, "to-hf", "--checkpoint", back, "--output", again, "--no-verify")[0] == 0
    h1, h2 = hf_weights(hf), hf_weights(again)
    assert sorted(h1) == sorted(h2) and all(torch.equal(h1[k], h2[k]) for k in h1)


def test_tied_embeddings(ckpt_tied, tmp_path, capsys):
    hf, back = tmp_path / "hf", tmp_path / "back"
    code, _, err = convert(capsys, "to-hf", "--checkpoint", ckpt_tied, "--output", hf)
    assert code == 0, err
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    weights = hf_weights(hf)
    assert "lm_head.weight" not in weights
    model, _ = load_hf(hf)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits
    assert (megatron_logits(ckpt_tied, TOKENS) - theirs).abs().max() <= 1e-4
    assert convert(capsys, "from-hf", "--model", hf, "--output", back)[0] == 0
    a, _ = megatron_state(ckpt_tied)
    b, _ = megatron_state(back)
    assert "output_layer.weight" not in a and sorted(a) == sorted(b)
    assert all(torch.equal(a[k][: b[k].shape[0]], b[k]) for k in a)


def test_bf16_export_sharded_with_an_index(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    code, stdout, err = convert(capsys, "to-hf", "--checkpoint", ckpt, "--output", out, "--dtype", "bf16",
                                "--max-shard-size", "300KB")
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert all((out / f).stat().st_size <= 300_000 or len(json.loads(_header(out / f))) <= 2 for f in files)
    model, _ = load_hf(out, torch.bfloat16)
    weights = hf_weights(out)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    sd, info = megatron_state(ckpt)
    assert torch.equal(weights["model.embed_tokens.weight"], sd["embedding.word_embeddings.weight"][:4096].bfloat16())
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["passed"] and v["dtype"] == "bfloat16" and v["relative_tolerance"] == 5e-2 and v["max_abs_diff"] > 0


def _header(path: Path) -> str:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8:8 + n].decode()


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def test_tp2_and_pp2_checkpoints_convert_to_the_same_weights_as_tp1(ckpt, tokenizer_dir, shards, tmp_path, capsys):
    """TP=2: the trainer on 2 gloo processes (same seed: megatron's CPU init draws the full matrices,
    then slices). PP=2: the TP=1 weights re-saved by a 2-stage pipeline model (`_resave_pp2` below;
    the trainer refuses PP on CPU, whose schedules need CUDA, but the stages and their checkpoint
    layout are megatron's own)."""
    tp2, pp2 = tmp_path / "tp2", tmp_path / "pp2"
    logs = [tmp_path / "tp2.log", tmp_path / "pp2.log"]
    tp2_args = pretrain_args(tokenizer_dir, shards, tp2, "--parallel.tensor", 2)
    procs = [_torchrun(["-m", "domainlm.cli", *tp2_args], logs[0]),
             _torchrun(["-m", "tests.test_convert", str(ckpt), str(pp2)], logs[1])]
    assert convert(capsys, "to-hf", "--checkpoint", ckpt, "--output", tmp_path / "hf1", "--no-verify")[0] == 0
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "TP=2 PP=1 DP=1" in logs[0].read_text() and "stage 1 of 2 holds output_layer.weight" in logs[1].read_text()
    a = hf_weights(tmp_path / "hf1")
    for src, out in ((tp2, tmp_path / "hf2"), (pp2, tmp_path / "hf3")):
        code, _, err = convert(capsys, "to-hf", "--checkpoint", src, "--output", out)
        assert code == 0, err
        b = hf_weights(out)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (src.name, k)


def _resave_pp2(src: str, dst: str) -> None:
    """Under torchrun (2 processes): load checkpoint dir `src` into a PP=2 model and save it to `dst`."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from domainlm.pretrain import checkpoint
    from domainlm.pretrain.convert import megatron as meg
    from domainlm.pretrain.model import build_model, transformer_config

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 2)
    info = meg.read_checkpoint_dir(src, None)
    config = transformer_config(info.model, pipeline=2, cpu=True)
    config.perform_initialization = False
    model = build_model(info.model, config, vocab_size=info.padded_vocab, seq_len=info.seq_len)
    state = checkpoint.load(info.root, info.step, {"model": model.sharded_state_dict()})
    model.load_state_dict(state["model"], strict=False)
    rank = dist.get_rank()
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in model.state_dict():
            print(f"stage {rank} of 2 holds {name}", flush=True)
    if rank == 0:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("iter_*", "latest"))
    dist.barrier()
    checkpoint.save(Path(dst), info.step, {"model": model.sharded_state_dict()}, keep_last=0)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# -- HF -> Megatron ----------------------------------------------------------------------------------


def stock_model(path: Path, tokenizer_dir: Path, *, arch: str = "llama", spm: bool = True, **extra) -> Path:
    """A random tiny stock transformers model with the session tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=3, initializer_range=0.2, **extra)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=50000.0, **kw))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, rope_theta=20000.0, **kw))
    model.save_pretrained(str(path))
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    names += ["tokenizer.model"] if spm else []
    for name in names:
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def test_stock_llama_from_hf_then_to_hf_gives_the_same_weights(tokenizer_dir, tmp_path, capsys):
    src = stock_model(tmp_path / "llama", tokenizer_dir)
    back, again = tmp_path / "back", tmp_path / "again"
    code, stdout, err = convert(capsys, "from-hf", "--model", src, "--output", back, "--tp", 2)
    assert code == 0, err
    assert "SentencePiece: shards and pretraining can use it" in stdout
    m = json.loads((back / "manifest.json").read_text())
    assert m["stage"] == "convert from-hf" and m["latest"] == "iter_0000000" and m["padded_vocab_size"] == 4096
    assert m["model"]["rotary_base"] == 50000.0 and m["model"]["ffn_hidden_size"] == 160
    assert m["verification"]["passed"] and m["verification"]["max_abs_logit"] > 2.0
    assert (back / "latest").read_text().strip() == "iter_0000000"
    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    run = load_config(PretrainConfig, back / "config.yaml")     # the run config it writes is valid
    assert run.init_from == str(back) and run.parallel.tensor == 2
    assert load_tokenizer_dir(back / "tokenizer").sha256 == load_tokenizer_dir(tokenizer_dir).sha256
    code, _, err = convert(capsys, "to-hf", "--checkpoint", back, "--output", again)
    assert code == 0, err
    a, b = hf_weights(src), hf_weights(again)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text())["rope_theta"] == 50000.0


def test_mistral_without_sliding_window_converts_with_matching_logits(tokenizer_dir, tmp_path, capsys):
    src = stock_model(tmp_path / "mistral", tokenizer_dir, arch="mistral", tie_word_embeddings=True)
    code, _, err = convert(capsys, "from-hf", "--model", src, "--output", tmp_path / "back")
    assert code == 0, err
    v = json.loads((tmp_path / "back" / "manifest.json").read_text())["verification"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["greedy_identical"] and v["max_abs_logit"] > 2.0


def test_pretrain_init_from_starts_from_the_converted_weights(tokenizer_dir, shards, tmp_path, capsys):
    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.loader import TokenWindowLoader
    from transformers import AutoModelForCausalLM

    src = stock_model(tmp_path / "llama", tokenizer_dir)
    back, run = tmp_path / "back", tmp_path / "run"
    assert convert(capsys, "from-hf", "--model", src, "--output", back, "--no-verify")[0] == 0
    args = ["--config", back / "config.yaml", "--data.shards", shards, "--checkpoint.dir", run,
            *TRAIN, "--optim.lr", "1e-3", "--optim.min-lr", "1e-4"]
    code, _, err = run_cli(["pretrain", *args], capsys)
    assert code == 0, err
    first = [json.loads(x) for x in (run / "logs/metrics.jsonl").read_text().splitlines()][0]
    assert first["kind"] == "train" and first["step"] == 1
    # The same global batch through the HF model: 2 micro-batches of 2 windows of 32 + 1 tokens.
    cfg = load_config(PretrainConfig, back / "config.yaml", {"data.shards": [str(shards)], "data.num_workers": "0"})
    loader = iter(TokenWindowLoader(cfg.data, split="train", seq_len=32, micro_batch_size=2, dp_rank=0, dp_size=1,
                                    vocab_size=4096, infinite=True))
    batch = torch.cat([next(loader), next(loader)])
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 4096), batch[:, 1:].reshape(-1)).item()
    assert abs(first["loss"] - ref) <= 1e-5, (first["loss"], ref)
    assert "init_from" in json.loads((run / "manifest.json").read_text())["config"]


def test_init_from_checks_architecture_and_tokenizer(tokenizer_dir, shards, tmp_path, capsys):
    src = stock_model(tmp_path / "llama", tokenizer_dir)
    back = tmp_path / "back"
    assert convert(capsys, "from-hf", "--model", src, "--output", back, "--no-verify")[0] == 0
    base = ["pretrain", "--data.shards", shards, "--checkpoint.dir", tmp_path / "run", *TRAIN]
    code, _, err = run_cli([*base, "--config", back / "config.yaml", "--model.ffn-hidden-size", 128], capsys)
    assert code == 2 and "holds a model of another architecture (model.ffn_hidden_size: 160 there, 128 here)" in err
    # A model with only tokenizer.json converts with an HF tokenizer (tests/test_cpt_hf_tokenizer.py
    # pretrains one); shards made with SentencePiece are another tokenizer's, refused before any compute.
    hf_only = stock_model(tmp_path / "hf_only", tokenizer_dir, spm=False)
    code, stdout, err = convert(capsys, "from-hf", "--model", hf_only, "--output", tmp_path / "back2", "--no-verify")
    assert code == 0, err
    assert "HF tokenizer.json (tokenizers library): shards and pretraining can use it" in stdout
    code, _, err = run_cli([*base, "--config", tmp_path / "back2" / "config.yaml"], capsys)
    assert code == 2 and "built with another tokenizer" in err and "reshard" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# -- bad input: one line, exit 2, nothing left behind --------------------------------------------


def _hf_config(**over) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 64,
           "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


BAD_HF = {
    "qwen2": (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
              "architecture 'Qwen2ForCausalLM' (model_type 'qwen2') is not supported; domainlm converts "
              "LlamaForCausalLM"),
    "gemma": (dict(architectures=["GemmaForCausalLM"], model_type="gemma"), "architecture 'GemmaForCausalLM'"),
    "gpt2": (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "architecture 'GPT2LMHeadModel'"),
    "sliding": (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
                "MistralForCausalLM with sliding_window=4096 (sliding-window attention is not implemented"),
    "llama3_rope": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "RoPE scaling type 'llama3'"),
    "bias": (dict(attention_bias=True), "attention_bias=true (the model has no biases)"),
    "head_dim": (dict(head_dim=32), "head_dim=32 != hidden_size/num_attention_heads=16"),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_unsupported_hf_models_are_refused_by_name(case, tmp_path, capsys):
    over, message = BAD_HF[case]
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_hf_config(**over)))
    code, _, err = convert(capsys, "from-hf", "--model", src, "--output", tmp_path / "out")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    no_leftovers(tmp_path / "out")


class _Boom:
    """Unpickling this creates a file: proof that a refused .bin was never unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_weights_are_refused_without_unpickling(tmp_path, capsys):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_hf_config()))
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(boom))
    code, _, err = convert(capsys, "from-hf", "--model", src, "--output", tmp_path / "out")
    assert code == 2 and "has its weights only as pickle files (pytorch_model.bin)" in err, err
    assert "reads safetensors only" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    no_leftovers(tmp_path / "out")


def test_bad_checkpoints_are_refused(ckpt, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = convert(capsys, "to-hf", "--checkpoint", other, "--output", tmp_path / "out")
    assert code == 2 and "has no manifest.json (it holds notes.txt), so it is not a checkpoint dir" in err, err
    code, _, err = convert(capsys, "to-hf", "--checkpoint", ckpt, "--iteration", 7, "--output", tmp_path / "out")
    assert code == 2 and "has no iteration 7; available iterations: 1" in err, err
    code, _, err = convert(capsys, "from-hf", "--model", ckpt, "--output", tmp_path / "out")
    assert code == 2 and "has no config.json" in err and "not a Hugging Face model directory" in err, err
    for e in (err,):
        assert len(e.strip().splitlines()) == 1 and "Traceback" not in e
    no_leftovers(tmp_path / "out")


def test_a_failed_verification_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """A mapping bug (gate and up swapped) must fail the export, not ship a broken model."""
    from domainlm.pretrain.convert import mapping as convert_mapping

    real = convert_mapping.to_hf

    def swapped(sd, m, vocab):
        out = real(sd, m, vocab)
        for i in range(m.num_layers):
            g, u = f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"
            out[g], out[u] = out[u], out[g]
        return out

    monkeypatch.setattr(convert_mapping, "to_hf", swapped)
    code, _, err = convert(capsys, "to-hf", "--checkpoint", ckpt, "--output", tmp_path / "out")
    assert code == 2 and "verification failed, nothing written to" in err and "max |logit diff|" in err, err
    no_leftovers(tmp_path / "out")


if __name__ == "__main__":
    _resave_pp2(*sys.argv[1:3])


def test_a_truncated_safetensors_file_is_named_before_anything_loads(tmp_path):
    """A weights file cut short (a download or a copy) is one line naming it, whether the cut falls
    in the tensors' bytes or in the header, through the HF dir contract every stage opens models by."""
    import pytest
    from safetensors.torch import save_file

    from domainlm.errors import UserError
    from domainlm.pretrain.convert.hfdir import check_safetensors, weight_files

    f = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(10)}, str(f))
    full = f.read_bytes()
    check_safetensors(f)
    assert weight_files(tmp_path) == [f]
    for cut, needle in ((len(full) - 1, "truncated safetensors file"), (len(full) // 2, "truncated safetensors file"),
                        (40, "header does not parse"), (4, "header does not parse"), (0, "header does not parse")):
        f.write_bytes(full[:cut])
        with pytest.raises(UserError, match=needle) as e:
            weight_files(tmp_path)
        assert str(f) in str(e.value) and "again" in str(e.value)


def test_a_world_of_one_leaves_the_traceback_hook_alone():
    """torch wraps sys.excepthook at every process-group init (a "[rank0]: " prefix a line); the
    stages `domainlm run` runs in one process stacked it. A world of one keeps the hook as it was."""
    import sys

    from domainlm.pretrain.convert.megatron import single_process

    hook = sys.excepthook
    for _ in range(2):
        with single_process():
            pass
    assert sys.excepthook is hook
