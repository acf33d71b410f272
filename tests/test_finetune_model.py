"""The fine-tuning model against references: the loss equals stock transformers' loss; packed rows
give the loss and gradients of the same samples unpacked (nothing leaks across samples); the
Triton kernels in the HF Llama modules give the loss and gradients of the torch path (kernels run
by Triton's CPU interpreter, TRITON_INTERPRET=1, and checked to have really run)."""

from __future__ import annotations


import pytest
import torch

from domainlm.finetune.batches import collate
from domainlm.finetune.chat import IGNORE, ChatEncoder, pad_id
from domainlm.finetune.model import LossModel
from tests.conftest import lora_model, triton_interpreter_env

# peft reads `is_gradient_checkpointing`, which transformers 5 deprecates: a library-version notice.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def samples(tokenizer_dir, pydoc_corpus):
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    enc = ChatEncoder(tok, (tokenizer_dir / "chat_template.jinja").read_text())
    qa = [json.loads(x) for x in (pydoc_corpus / "qa.jsonl").read_text().splitlines()[:6]]
    convs = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in qa]
    convs[2] = convs[2] + [{"role": "user", "content": "Thanks. Anything else?"},
                           {"role": "assistant", "content": "No."}]
    return enc.encode_many(convs), pad_id(tok)


def loss_and_grads(model, loss_model, batches):
    model.zero_grad(set_to_none=True)
    total = sum(loss_model(mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids) for mb in batches)
    count = sum(int((mb.labels[:, 1:] != IGNORE).sum()) for mb in batches)
    (total / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(total.detach() / count), grads, total


def graph_ops(t: torch.Tensor) -> set[str]:
    names, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_loss_equals_stock_transformers(tiny_hf_model, samples):
    enc, pad = samples
    model = lora_model(tiny_hf_model)
    mb = collate([[s] for s in enc], pad, packed=False)
    ours = LossModel(model)(mb.input_ids, mb.labels, mb.attention_mask) / int((mb.labels[:, 1:] != IGNORE).sum())
    stock = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=mb.labels).loss
    torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)


def test_packed_batch_equals_the_same_samples_unpacked(tiny_hf_model, samples):
    enc, pad = samples
    model = lora_model(tiny_hf_model)
    lm = LossModel(model)
    unpacked = [collate([[s] for s in enc[:3]], pad, packed=False), collate([[s] for s in enc[3:]], pad, packed=False)]
    packed = [collate([enc[:3], enc[3:5], enc[5:]], pad, packed=True)]
    assert packed[0].position_ids[0].tolist().count(0) == 3        # the widest row: 3 samples, no tail
    assert packed[0].position_ids[1].tolist().count(0) == 3        # 2 samples + the padded tail
    loss_a, grads_a, _ = loss_and_grads(model, lm, unpacked)
    loss_b, grads_b, _ = loss_and_grads(model, lm, packed)
    assert abs(loss_a - loss_b) <= 1e-5
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-5, msg=n)
    # A control: the same row with position ids that do not restart lets the samples attend to
    # each other, and the loss moves.
    leaky = collate([enc[:3], enc[3:5], enc[5:]], pad, packed=True)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1]).expand_as(leaky.input_ids).contiguous()
    assert abs(loss_and_grads(model, lm, [leaky])[0] - loss_a) > 1e-3


@pytest.fixture()
def interpreter():
    with triton_interpreter_env():
        yield


def test_triton_kernels_in_hf_llama_equal_the_torch_path(tmp_path, tokenizer_dir, interpreter):
    """A tiny Llama with a 256-token vocab: the interpreter runs the fused cross-entropy one
    token row at a time, so a small vocab keeps this test in seconds (the kernels' own tests in
    test_kernels.py cover large vocabs and chunking)."""
    from domainlm.finetune.chat import Encoded
    from domainlm.finetune.kernels import apply_kernels
    from tests.conftest import tiny_llama

    hf_dir = tiny_llama(tmp_path / "v256", tokenizer_dir, vocab_size=256)
    g = torch.Generator().manual_seed(0)

    def sample(n, learn):
        ids = torch.randint(4, 256, (n,), generator=g).tolist()
        return Encoded(ids, [IGNORE] * (n - learn) + ids[n - learn:])

    enc = [sample(9, 4), sample(6, 3), sample(7, 2), sample(4, 2), sample(5, 3)]
    batches = [collate([[s] for s in enc[:2]], 0, packed=False), collate([enc[2:4], enc[4:]], 0, packed=True)]
    ref = lora_model(hf_dir)
    loss_ref, grads_ref, _ = loss_and_grads(ref, LossModel(ref), batches)
    ours = lora_model(hf_dir)
    counts = apply_kernels(ours)
    # 2 layers x 2 norms + final; 2 MLPs; 2 attns; 2 x 7 adapted projections
    assert counts == {"rms_norm": 5, "swiglu": 2, "rotary": 2, "lora_addmm": 14}
    loss, grads, total = loss_and_grads(ours, LossModel(ours, fused=True), batches)
    # The kernels' autograd Functions are in the graph (no silent fallback to the references).
    names = graph_ops(total)
    assert {"RMSNormFunctionBackward", "SwiGLUFunctionBackward", "RotaryFunctionBackward",
            "LinearCrossEntropyFunctionBackward"} <= names
    assert abs(loss - loss_ref) <= 1e-5
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-5, msg=n)
    # The swap keeps the state dict as it was: the adapter files do not know about the kernels.
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_recomputed_norm_and_swiglu_outputs_give_the_same_gradients_and_keep_less(tmp_path, tokenizer_dir,
                                                                                 interpreter):
    """recompute_elementwise (issue 21, LoRA memory): backward recomputes the norms' and SwiGLU's
    outputs instead of keeping them for the LoRA A projections that read them. The gradients are
    bitwise those of keeping them, and what autograd keeps is smaller by exactly 2H + F values a
    token and layer (two norm outputs of width H, one SwiGLU output of width F; fp32 here), counted
    by an enclosing saved-tensor hook, which the recompute hooks pass the rest through to."""
    from domainlm.finetune.chat import Encoded
    from domainlm.finetune.kernels import apply_kernels, recompute_elementwise
    from domainlm.pretrain.memory import saved_for_backward_bytes
    from tests.conftest import tiny_llama

    hf_dir = tiny_llama(tmp_path / "v256", tokenizer_dir, vocab_size=256)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 256, (9,), generator=g).tolist()
    batches = [collate([[Encoded(ids, [IGNORE] * 4 + ids[4:])]], 0, packed=False)]
    model = lora_model(hf_dir)
    apply_kernels(model)
    kept, recomputed = LossModel(model, fused=True), LossModel(model, fused=True, recompute=True)
    loss_a, grads_a, _ = loss_and_grads(model, kept, batches)
    loss_b, grads_b, _ = loss_and_grads(model, recomputed, batches)
    assert loss_a == loss_b
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n

    mb = batches[0]
    params = list(model.parameters())
    bytes_kept = saved_for_backward_bytes(lambda: kept(mb.input_ids, mb.labels), exclude=params)
    bytes_recomputed = saved_for_backward_bytes(lambda: recomputed(mb.input_ids, mb.labels), exclude=params)
    h, f, layers, tokens = 64, 160, 2, 9
    assert bytes_kept - bytes_recomputed == layers * tokens * (2 * h + f) * 4
    # The hooks are gone after the forward, and a forward without grad registers nothing.
    with recompute_elementwise(), torch.no_grad():
        recomputed(mb.input_ids, mb.labels)
    assert saved_for_backward_bytes(lambda: kept(mb.input_ids, mb.labels), exclude=params) == bytes_kept


def test_bf16_lora_keeps_one_copy_of_each_input_and_recomputes_the_elementwise_ones(tmp_path, tokenizer_dir,
                                                                                   interpreter):
    """bf16 training as the trainer runs it (bf16 base, fp32 adapters, autocast). peft casts each LoRA
    layer's input to fp32 and autocast casts it back, so every LoRA A keeps its own copy;
    keep_input_dtype turns the cast off and q, k, v share the attention norm's output, gate and up
    the MLP norm's: 3H values a token and layer fewer (eager attention here, whose output copy only
    o_proj reads; with SDPA's flash layout o_proj's copy goes too). With the kernels and
    recompute_elementwise, 2H + F fewer again. The gradients are bitwise the same in all four."""
    from domainlm.finetune.model import keep_input_dtype
    from domainlm.pretrain.memory import saved_for_backward_bytes
    from tests.conftest import tiny_llama

    hf_dir = tiny_llama(tmp_path / "v256", tokenizer_dir, vocab_size=256)
    ids = torch.randint(4, 256, (1, 9), generator=torch.Generator().manual_seed(1))

    def run(keep: bool, kernels: bool, recompute: bool):
        model = lora_model(hf_dir, dtype=torch.bfloat16, attn="eager", kernels=kernels)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        if keep:
            assert keep_input_dtype(model) == 14                         # 7 projections x 2 layers
        lm = LossModel(model, fused=kernels, recompute=recompute)

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return lm(ids, ids)

        kept = saved_for_backward_bytes(forward, exclude=list(model.parameters()))
        forward().backward()
        return kept, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    h, f, layers, tokens, bf16 = 64, 160, 2, 9, 2
    for kernels, variants in [(False, [(True, False, 3 * h)]),
                              (True, [(False, True, 0), (True, False, 3 * h), (True, True, 3 * h + 2 * h + f)])]:
        stock, grads = run(False, kernels, False)
        for keep, recompute, fewer in variants:
            kept, g = run(keep, kernels, recompute)
            assert all(torch.equal(g[n], grads[n]) for n in grads), (kernels, keep, recompute)
            assert stock - kept == layers * tokens * fewer * bf16, (kernels, keep, recompute)
    # DoRA's layers keep peft's cast: its variant does fp32 elementwise work on the input.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16),
                          LoraConfig(r=8, target_modules="all-linear", use_dora=True))
    assert keep_input_dtype(dora) == 0


def test_fused_lora_linear_equals_peft_and_leaves_the_rest_to_peft(tiny_hf_model, samples):
    """FusedLoraLinear (--kernels triton): base(x) + s * A(x) B^T as one addmm gives peft's loss and
    gradients; where it is not one plain adapter (dropout, DoRA, adapters disabled) peft's own
    forward runs, bitwise."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from domainlm.finetune.kernels import apply_kernels

    enc, pad = samples
    batches = [collate([[s] for s in enc[:3]], pad, packed=False)]
    ref = lora_model(tiny_hf_model)
    loss_ref, grads_ref, total_ref = loss_and_grads(ref, LossModel(ref), batches)
    ours = lora_model(tiny_hf_model)
    assert apply_kernels(ours)["lora_addmm"] == 14
    loss, grads, total = loss_and_grads(ours, LossModel(ours), batches)
    assert "AddmmBackward0" in graph_ops(total) and "AddmmBackward0" not in graph_ops(total_ref)
    assert abs(loss - loss_ref) <= 1e-6 * abs(loss_ref)
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-5, atol=1e-7, msg=n)

    mb = batches[0]
    with ours.disable_adapter():                               # the base alone, as peft computes it
        off = LossModel(ours)(mb.input_ids, mb.labels, mb.attention_mask)
    with ref.disable_adapter():
        assert torch.equal(off, LossModel(ref)(mb.input_ids, mb.labels, mb.attention_mask))
    for kw in ({"lora_dropout": 0.1}, {"use_dora": True}):
        pair = []
        for fused in (False, True):
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model), dtype=torch.float32)
            model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", **kw))
            if fused:
                apply_kernels(model)
            torch.manual_seed(1)                               # the same dropout masks
            pair.append(LossModel(model)(mb.input_ids, mb.labels, mb.attention_mask))
        assert torch.equal(pair[0], pair[1]), kw
        assert "AddmmBackward0" not in graph_ops(pair[1]), kw


def test_qlora_base_stays_bf16_where_peft_would_cast_it_to_fp32(tiny_hf_model):
    """QLoRA's base preparation (issue 21: QLoRA took more GPU memory than bf16 LoRA): ours freezes
    the base and leaves its bf16 parameters bf16, so the hidden states stay bf16 under autocast;
    peft's prepare_model_for_kbit_training casts the embedding, norms and output layer to fp32,
    and the residual stream follows (bench/activations.py --qlora counts what that keeps)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from domainlm.finetune.model import prepare_quantized

    ours = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model), dtype=torch.bfloat16)
    prepare_quantized(ours)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ours.parameters())
    theirs = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(str(tiny_hf_model),
                                                                                  dtype=torch.bfloat16),
                                             use_gradient_checkpointing=False)
    assert theirs.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours.model(input_ids=ids).last_hidden_state.dtype == torch.bfloat16
        assert theirs.model(input_ids=ids).last_hidden_state.dtype == torch.float32
