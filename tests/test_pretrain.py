"""`domainlm pretrain` on CPU (gloo): the tiny model trains, TP=2 equals TP=1, exact resume after a
kill, resume under another TP size, two "nodes" through torchrun's rendezvous against gradient
accumulation, and every bad input refused before compute.

Shards are the pydoc corpus tokenized with the session's tokenizer, written in the real shard
format. Multi-process runs go through torchrun and the real CLI; single-process runs call the
CLI in this process (the trainer tears its process group down at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, token_shards

COMMON = ["--model.size", "tiny", "--train.seq-len", "32", "--train.micro-batch-size", "2",
          "--train.global-batch-size", "4", "--schedule.warmup-steps", "2", "--eval.every", "0",
          "--log.every", "1", "--log.tensorboard", "false", "--data.num-workers", "0",
          "--checkpoint.keep-last", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir, pydoc_corpus) -> Path:
    """The pydoc corpus tokenized into 2 train shards and 1 valid shard, as `domainlm data shard` writes."""
    return token_shards(tmp_path_factory.mktemp("shards") / "shards", tokenizer_dir, pydoc_corpus,
                        train=[400, 400], valid=100)


def args(tokenizer_dir, shards, ckpt, *extra, common: list[str] = COMMON) -> list[str]:
    return ["pretrain", "--tokenizer", str(tokenizer_dir), "--data.shards", str(shards),
            "--checkpoint.dir", str(ckpt), *common, *map(str, extra)]


def losses(ckpt: Path) -> dict[int, float]:
    """step -> training loss from DIR/logs/metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (ckpt / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def torchrun(cli_args: list[str], *, nproc: int = 1, extra: list[str] = (), log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([*TORCHRUN, *extra, f"--nproc-per-node={nproc}", "-m", "domainlm.cli", *cli_args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_ok(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


# -- training -------------------------------------------------------------------------------


def test_tiny_model_trains_and_writes_a_checkpoint_dir(tokenizer_dir, shards, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code, out, err = run_cli(args(tokenizer_dir, shards, ckpt, "--train.max-steps", 40, "--optim.lr", 3e-3,
                                  "--optim.min-lr", 3e-4, "--eval.every", 20, "--eval.batches", 4,
                                  "--checkpoint.save-every", 20, "--log.tensorboard", "true",
                                  "--log.every", 10, "--train.recompute", "selective"), capsys)
    assert code == 0, err
    train = [json.loads(x) for x in (ckpt / "logs/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in train if r["kind"] == "train"]
    evals = [r for r in train if r["kind"] == "eval"]
    assert steps[0]["loss"] > 7.5                       # ~ln(4096) at init
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.5   # and it learns
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[2]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"] - 1.0
    for key in ("lr", "grad_norm", "tokens_per_s", "memory_gb"):
        assert steps[-1][key] is not None and steps[-1][key] > 0
    assert "val ppl" in err and "tok/s" in err and "domainlm pretrain" in out   # progress line, summary
    assert list((ckpt / "logs/tensorboard").glob("events.out.tfevents.*"))
    # The checkpoint dir contract: iter dirs, `latest` last, run config, tokenizer copy, manifest.
    assert (ckpt / "latest").read_text().strip() == "iter_0000040"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000020", "iter_0000040"]
    assert (ckpt / "iter_0000040/metadata.json").is_file()
    assert (ckpt / "tokenizer/tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["latest"] == "iter_0000040"
    assert manifest["model"]["hidden_size"] == 64 and manifest["padded_vocab_size"] % 128 == 0
    assert "num_layers: 2" in (ckpt / "config.yaml").read_text()


def test_a_valid_split_smaller_than_a_micro_batch_is_read_in_smaller_ones(tokenizer_dir, pydoc_corpus, tmp_path,
                                                                           capsys):
    """A small corpus whose valid split drew one short document (fewer windows than a micro batch)
    validates on micro batches of what it holds: the validation loss at step 0 is the one a run
    whose micro batch is that size computes (the same initial weights, the same windows)."""
    from domainlm.pretrain.loader import TokenWindowLoader
    from domainlm.pretrain.config import DataArgs

    small = token_shards(tmp_path / "shards", tokenizer_dir, pydoc_corpus, train=[200], valid=1)
    windows = len(TokenWindowLoader(DataArgs(shards=[str(small)]), split="valid", seq_len=32, micro_batch_size=1,
                                    infinite=False))
    assert 1 <= windows < 16
    evals = {}
    for mbs, ckpt in ((16, tmp_path / "big"), (windows, tmp_path / "small")):
        code, out, err = run_cli(args(tokenizer_dir, small, ckpt, "--train.max-steps", 3, "--eval.every", 3,
                                      "--train.micro-batch-size", mbs, "--train.global-batch-size", mbs), capsys)
        assert code == 0, err[-3000:]
        evals[mbs] = [json.loads(x) for x in (ckpt / "logs/metrics.jsonl").read_text().splitlines()
                      if json.loads(x)["kind"] == "eval"]
        warned = f"holds {windows} window(s) of 32 tokens, less than one micro batch of 16: validating on 1 micro " \
                 f"batch(es) of {windows}"
        assert (warned in " ".join(err.split())) == (mbs == 16), err[-3000:]
    assert evals[16][0]["step"] == 0 and evals[16][0]["val_loss"] == pytest.approx(evals[windows][0]["val_loss"],
                                                                                   rel=1e-6)
    # no whole window at all is still refused, with the fix
    code, _, err = run_cli(args(tokenizer_dir, small, tmp_path / "none", "--train.max-steps", 3, "--eval.every", 3,
                                "--train.seq-len", 4096), capsys)
    assert code == 2 and "valid split holds 0 window(s) of 4096 tokens" in err and "--valid-fraction" in err, err


def test_kill_then_resume_gives_the_uninterrupted_losses(tokenizer_dir, shards, tmp_path, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    code, _, err = run_cli(args(tokenizer_dir, shards, full, "--train.max-steps", 30), capsys)
    assert code == 0, err
    log = tmp_path / "killed.log"
    proc = subprocess.Popen([sys.executable, "-m", "domainlm.cli", *args(tokenizer_dir, shards, killed, "--train.max-steps", 30)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = killed / "logs/metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)   # the rank finishes its step, saves and exits 0
    wait_ok(proc, log)
    stopped_at = int((killed / "latest").read_text().strip()[5:])
    assert 3 <= stopped_at < 30, "the run finished before the signal landed"
    assert "stopped by SIGTERM" in log.read_text()
    code, _, err = run_cli(args(tokenizer_dir, shards, killed, "--train.max-steps", 30), capsys)
    assert code == 0, err
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 31))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6


def test_tp2_equals_tp1_and_a_tp2_checkpoint_resumes_at_tp1(tokenizer_dir, shards, tmp_path, capsys):
    tp2, tp1, moved = tmp_path / "tp2", tmp_path / "tp1", tmp_path / "moved"
    log = tmp_path / "tp2.log"
    proc = torchrun(args(tokenizer_dir, shards, tp2, "--train.max-steps", 6, "--parallel.tensor", 2,
                         "--checkpoint.save-every", 3), nproc=2, log=log, extra=["--standalone"])
    code, _, err = run_cli(args(tokenizer_dir, shards, tp1, "--train.max-steps", 6), capsys)   # meanwhile
    assert code == 0, err
    wait_ok(proc, log)
    a, b = losses(tp1), losses(tp2)
    assert "TP=2 PP=1 DP=1" in log.read_text()
    # Same init (megatron's CPU init draws the full matrices, then each TP rank takes its slice).
    assert max(abs(a[s] - b[s]) for s in range(1, 7)) <= 1e-5
    # Save at TP=2, resume at TP=1: the sharded checkpoint reshards model and optimizer state.
    shutil.copytree(tp2, moved)
    shutil.rmtree(moved / "iter_0000006")
    (moved / "latest").write_text("iter_0000003\n")
    (moved / "logs/metrics.jsonl").unlink()
    code, _, err = run_cli(args(tokenizer_dir, shards, moved, "--train.max-steps", 6), capsys)
    assert code == 0, err
    assert "resumed from iter_0000003 (layout {'tensor': 2" in err
    c = losses(moved)
    assert sorted(c) == [4, 5, 6]
    assert max(abs(b[s] - c[s]) for s in c) <= 1e-5


def test_two_nodes_through_rendezvous_match_gradient_accumulation(tokenizer_dir, shards, tmp_path, capsys):
    """Two torchrun agents (--nnodes 2, one process each) meet at a c10d rendezvous on localhost
    and train DP=2; one process accumulating the same two micro-batches gives the same losses."""
    import socket

    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = tmp_path / "dp2"
    cli = args(tokenizer_dir, shards, ckpt, "--train.max-steps", 5)
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test-dp2"]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [torchrun(cli, log=logs[i], extra=rdzv) for i in range(2)]
    for p, log in zip(procs, logs):
        wait_ok(p, log)
    assert any("TP=1 PP=1 DP=2, 1 micro-batches of 2" in log.read_text() for log in logs)

    # Reference: one process, 2 micro-batches per step: DP rank 0's then DP rank 1's windows.
    overrides = {"tokenizer": str(tokenizer_dir), "data.shards": [str(shards)], "checkpoint.dir": str(tmp_path / "ref"),
                 "train.max_steps": "5", **{k.lstrip("-").replace("-", "_"): v for k, v in zip(COMMON[::2], COMMON[1::2])}}
    trainer = Trainer(load_config(PretrainConfig, None, overrides))
    try:
        trainer.setup()
        assert trainer.num_micro == 2
        ranks = [iter(_loader(trainer, r)) for r in range(2)]
        trainer.train_iter = (next(ranks[i % 2]) for i in range(10**9))
        trainer.train()
        ref = {h["step"]: h["loss"] for h in trainer.history}
    finally:
        trainer.close()
    got = losses(ckpt)
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert max(abs(ref[s] - got[s]) for s in got) <= 1e-5
    # The DP=2 checkpoint resumes in one process (DP=1): weights and optimizer state load, the
    # data stream (per DP rank) restarts in a new order, as the warning says.
    code, _, err = run_cli(args(tokenizer_dir, shards, ckpt, "--train.max-steps", 7), capsys)
    assert code == 0, err
    assert "the data stream restarts in a new order" in err and "resumed from iter_0000005" in err
    assert sorted(losses(ckpt)) == [1, 2, 3, 4, 5, 6, 7]


def _loader(trainer, dp_rank: int):
    from domainlm.pretrain.loader import TokenWindowLoader

    t = trainer.cfg.train
    return TokenWindowLoader(trainer.cfg.data, split="train", seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                             dp_rank=dp_rank, dp_size=2)


# -- the model against a reference -----------------------------------------------------------


def test_model_is_a_llama_its_logits_match_transformers(tmp_path):
    """The megatron model with its weights copied into stock transformers' LlamaForCausalLM gives
    the same logits: RMSNorm, SwiGLU, RoPE (theta), GQA and untied embeddings as Llama."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import LlamaConfig, LlamaForCausalLM

    from domainlm.pretrain import cpu_compat
    from domainlm.pretrain.config import ModelArgs
    from domainlm.pretrain.convert.mapping import to_hf
    from domainlm.pretrain.model import build_model, padded_vocab, transformer_config, unwrap
    from domainlm.pretrain.config import resolve_model

    m = resolve_model(ModelArgs(size="tiny", rotary_base=50000.0))
    vocab = 300
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        cpu_compat.model_parallel_manual_seed(0)
        model = unwrap(build_model(m, transformer_config(m, cpu=True), vocab_size=padded_vocab(vocab, 128, 1), seq_len=16))
        model.eval()
        tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(tokens, torch.arange(16).unsqueeze(0).expand_as(tokens), None)[..., :vocab]
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_eps, rope_theta=m.rotary_base,
            max_position_embeddings=16, tie_word_embeddings=False, attention_bias=False, mlp_bias=False))
        hf.load_state_dict(to_hf(model.state_dict(), m, vocab))
        hf.eval()
        with torch.no_grad():
            theirs = hf(tokens).logits
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    finally:
        cpu_compat.restore_megatron_rng()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- bad input: one line, exit 2, before any compute -----------------------------------------


BAD = {
    "heads": (["--model.num-attention-heads", "5"], "model.num_attention_heads=5 does not divide model.hidden_size=64"),
    "groups": (["--model.num-query-groups", "3"], "model.num_query_groups=3 does not divide"),
    "tp_heads": (["--parallel.tensor", "3"], "parallel.tensor=3 does not divide the heads"),
    "tp_world": (["--parallel.tensor", "2"], "1 processes cannot hold parallel.tensor=2"),
    "batch": (["--train.global-batch-size", "5"], "train.global_batch_size=5 is not a multiple of train.micro_batch_size=2"),
    "pp_layers": (["--parallel.pipeline", "3"], "parallel.pipeline=3 exceeds model.num_layers=2"),
    "bf16_cpu": (["--train.precision", "bf16"], "train.precision=bf16 needs a GPU"),
    "size": (["--model.size", "13B"], "model.size: no size '13B'; named sizes: 125M, 1B, 350M, 3B, 7B, tiny"),
    # Optimizer values torch would refuse with a traceback (or take silently), each named with its value.
    "beta1": (["--optim.beta1", "2"], "optim.beta1 must be in [0, 1), got 2.0"),
    "beta2": (["--optim.beta2", "1.5"], "optim.beta2 must be in [0, 1), got 1.5"),
    "eps": (["--optim.eps", "-1"], "optim.eps must be > 0, got -1.0"),
    "weight_decay": (["--optim.weight-decay", "-1"], "optim.weight_decay must be >= 0, got -1.0"),
    "clip_grad": (["--optim.clip-grad", "-1"], "optim.clip_grad must be >= 0 (0 turns clipping off), got -1.0"),
    "lr": (["--optim.lr", "-1"], "optim.lr must be in [0, 1] (AdamW; pretraining usually takes 1e-4 to 3e-3), got -1.0"),
    "lr_huge": (["--optim.lr", "1e38"], "optim.lr must be in [0, 1]"),     # overflowed in the schedule
    # Values that trained to a NaN loss (and saved it) or failed in torch's init.
    "rotary_base": (["--model.rotary-base", "0"], "model.rotary_base must be positive, got 0.0"),
    "norm_eps": (["--model.norm-eps", "-1"], "model.norm_eps must be positive, got -1.0"),
    "init_std": (["--model.init-std", "-0.02"], "model.init_std must be positive, got -0.02"),
    "eval_batches": (["--eval.batches", "0"], "eval.batches must be positive, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_before_compute(case, tokenizer_dir, shards, tmp_path, capsys):
    import torch.distributed as dist

    extra, message = BAD[case]
    code, _, err = run_cli(args(tokenizer_dir, shards, tmp_path / "ck", "--train.max-steps", 4, *extra), capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ck").exists() and not dist.is_initialized()


def test_a_non_finite_loss_stops_the_run_without_saving_that_step(tokenizer_dir, shards, tmp_path, capsys,
                                                                  monkeypatch):
    """A diverged step (here: its loss made NaN from step 2 on) ends the run with one line and exit 2;
    the checkpoints before it stay, the diverged state is never saved."""
    from domainlm.pretrain.trainer import Trainer

    mean_loss = Trainer._mean_loss
    monkeypatch.setattr(Trainer, "_mean_loss",
                        lambda self, store: float("nan") if self.step >= 2 else mean_loss(self, store))
    ckpt = tmp_path / "ck"
    code, _, err = run_cli(args(tokenizer_dir, shards, ckpt, "--train.max-steps", 3, "--checkpoint.save-every", 1),
                           capsys)
    assert code == 2 and "error: loss is nan at step 2; training diverged (this step is not saved)" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"


def test_batch_not_divisible_by_micro_times_dp(tokenizer_dir, shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")   # as torchrun would set it for 2 processes: DP=2
    code, _, err = run_cli(args(tokenizer_dir, shards, tmp_path / "ck", "--train.global-batch-size", 6), capsys)
    assert code == 2 and "not divisible by train.micro_batch_size x data-parallel size = 2 x 2" in err, err


def test_shards_of_another_tokenizer_are_refused(tokenizer_dir, shards, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "cd" * 32
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(args(tokenizer_dir, other, tmp_path / "ck"), capsys)
    assert code == 2 and "built with another tokenizer" in err and str(other) in err, err
    assert not (tmp_path / "ck").exists()


def test_a_dir_that_is_not_a_checkpoint_dir_is_refused(tokenizer_dir, shards, tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    code, _, err = run_cli(args(tokenizer_dir, shards, tmp_path / "ck"), capsys)
    assert code == 2 and "is not a domainlm pretrain checkpoint dir (it holds notes.txt" in err, err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["notes.txt"]


def test_resuming_another_architecture_lists_the_differing_keys(tokenizer_dir, shards, tmp_path, capsys):
    ck = tmp_path / "ck"
    code, _, err = run_cli(args(tokenizer_dir, shards, ck, "--train.max-steps", 3), capsys)
    assert code == 0, err
    code, _, err = run_cli(args(tokenizer_dir, shards, ck, "--train.max-steps", 4, "--model.ffn-hidden-size", 128,
                                "--model.tie-embeddings", "true"), capsys)
    assert code == 2, err
    assert "model.ffn_hidden_size: 192 there, 128 here" in err and "model.tie_embeddings" in err
    assert "num_layers" not in err
    code, _, err = run_cli(args(tokenizer_dir, shards, ck, "--train.max-steps", 4, "--checkpoint.resume", "false"), capsys)
    assert code == 2 and "holds checkpoints up to step 3" in err, err


# -- sizes, vocab padding, launch ---------------------------------------------------------------


def test_named_sizes_are_the_yaml_files_and_resolve():
    from domainlm.pretrain.config import ModelArgs
    from domainlm.pretrain.model import count_parameters, padded_vocab
    from domainlm.pretrain.config import MODEL_DIR, resolve_model, sizes

    assert sorted(sizes()) == ["125M", "1B", "350M", "3B", "7B", "tiny"]
    assert sorted(p.stem for p in MODEL_DIR.glob("*.yaml")) == sorted(sizes())
    m = resolve_model(ModelArgs(size="1B", num_layers=4))       # a set field overrides the size
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.rotary_base) == (4, 2048, 8, 500000.0)
    # Llama-3.2-1B-shaped, untied, 32k vocab: about 1.2B parameters; 125M about 124M with GPT-2's vocab.
    assert 1.1e9 < count_parameters(resolve_model(ModelArgs(size="1B")), 32000)["total"] < 1.4e9
    assert 1.1e8 < count_parameters(resolve_model(ModelArgs(size="125M", tie_embeddings=True)), 50304)["total"] < 1.3e8
    assert padded_vocab(8064, 128, 1) == padded_vocab(8064, 128, 2) == padded_vocab(8064, 128, 8) == 8064
    assert padded_vocab(4001, 128, 2) == 4096 and padded_vocab(4001, 128, 3) == 4224   # lcm(128, 3) = 384


def test_launch_prints_torchrun_and_slurm_commands(capsys):
    base = ["launch", "pretrain", "--dry-run"]
    code, out, _ = run_cli(base + ["--cpu", "--gpus-per-node", "2", "--", "--config", "c.yaml"], capsys)
    assert code == 0
    from domainlm.launch.command import stop_flags

    flags = " ".join(stop_flags(600)[0])   # what this torch's torchrun takes (tests/test_launch.py)
    assert f"-m torch.distributed.run {flags + ' ' if flags else ''}--nnodes=1 --nproc-per-node=2 --standalone " \
           "-m domainlm.cli pretrain --config c.yaml --train.device cpu" in out
    code, out, _ = run_cli(base + ["--nodes", "2", "--gpus-per-node", "8", "--rdzv-endpoint", "n1:29500", "--",
                                   "--config", "c.yaml"], capsys)
    assert code == 0 and "--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=n1:29500" in out
    code, out, _ = run_cli(base + ["--nodes", "4", "--gpus-per-node", "8", "--slurm", "--", "--config", "c.yaml"], capsys)
    assert code == 0 and out.startswith("sbatch --nodes=4 --gpus-per-node=8 ") and "launch/slurm.sbatch --config c.yaml" in out
    code, _, err = run_cli(base + ["--nodes", "2", "--gpus-per-node", "8", "--", "--config", "c.yaml"], capsys)
    assert code == 2 and "needs --rdzv-endpoint" in err
    for script in ("torchrun_single.sh", "torchrun_multinode.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0
