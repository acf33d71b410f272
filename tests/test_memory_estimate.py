"""pretrain/memory.py: the parameter counts against transformers' Llama and Meta's published
Llama 3 8B count, the split over pipeline stages, and what each layout choice changes."""

from __future__ import annotations

import pytest

from domainlm.errors import UserError
from domainlm.pretrain.config import ModelArgs, resolve_model
from domainlm.pretrain.memory import estimate, main


def test_parameters_match_transformers_llama():
    import transformers

    m = resolve_model(ModelArgs(size="tiny"))
    vocab = 512   # a multiple of make_vocab_size_divisible_by: no padding on either side
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                                   num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                                   num_key_value_heads=m.num_query_groups, tie_word_embeddings=m.tie_embeddings)
    hf = transformers.LlamaForCausalLM(cfg)
    assert estimate(m, vocab=vocab, seq_len=16).params_total == sum(p.numel() for p in hf.parameters())


def test_7b_shape_with_llama3_vocab_is_llama3_8b():
    m = resolve_model(ModelArgs(size="7B"))
    assert round(estimate(m, vocab=128256, seq_len=8192).params_total / 1e9, 2) == 8.03   # Meta: 8.03B


def test_stages_hold_the_model_and_layouts_move_memory():
    m = resolve_model(ModelArgs(size="7B"))
    one = estimate(m, vocab=32000, seq_len=4096)
    pp2 = estimate(m, vocab=32000, pp=2, seq_len=4096)
    assert pp2.params_per_gpu + pp2.params_per_gpu_last == one.params_total    # untied: nothing shared
    base = dict(vocab=32000, tp=2, pp=2, dp=4, seq_len=4096)
    e = estimate(m, **base)
    # 6 bytes/parameter on every rank, 12 over the 4 DP ranks
    assert e.states_gb == pytest.approx(e.params_per_gpu * 9 / 1024**3)
    assert estimate(m, **base, distributed_optimizer=False).states_gb == pytest.approx(e.params_per_gpu * 18 / 1024**3)
    # sequence parallelism divides the norm and linear inputs by TP too; full recomputation keeps 2sbh/TP a layer
    assert estimate(m, **base, sequence_parallel=False).activations_gb > e.activations_gb
    full = estimate(m, **base, recompute="full")
    assert full.activations_gb == pytest.approx(2 * 4096 * 4096 / 2 * 16 * 2 / 1024**3)
    # a Llama layer at the 7B shape keeps 34 sbh bytes with the fused SwiGLU (the paper's GPT figure,
    # by coincidence); megatron's eager one keeps 2 more values of f = 3.5 h a token: 48 sbh
    fused = estimate(resolve_model(ModelArgs(size="7B", kernels="triton")), **base)
    assert fused.activations_gb == pytest.approx(34 * 4096 * 4096 / 2 * 16 * 2 / 1024**3)
    assert e.activations_gb == pytest.approx(48 * 4096 * 4096 / 2 * 16 * 2 / 1024**3)
    # the interleaved schedule keeps (1 + (P-1)/(P V)) times more in flight
    assert estimate(m, **base, vpp=2).activations_gb == pytest.approx(e.activations_gb * 1.25)


def test_a_layout_that_does_not_divide_the_layers_is_refused(capsys):
    with pytest.raises(UserError, match="does not divide model.num_layers=32"):
        estimate(resolve_model(ModelArgs(size="7B")), vocab=32000, pp=3, seq_len=128)
    assert main(["--size", "7B", "--vocab", "32000", "--pp", "2", "--vpp", "3", "--seq-len", "128"]) == 2
    assert "does not divide" in capsys.readouterr().err
