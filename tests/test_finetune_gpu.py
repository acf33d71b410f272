"""`domainlm finetune` on a GPU: the Triton kernels compiled (not interpreted) in the HF Llama
modules against the torch path in bf16, a LoRA run with --kernels triton and its merge, and QLoRA
(bitsandbytes NF4 base) trained and merged into the dequantized base. Skipped (with the reason)
where CUDA is absent; QLoRA also where bitsandbytes is not installed.

Inputs: the session tokenizer (or DOMAINLM_GPU_INPUTS/tokenizer, built on a CPU machine by
bench/gpu_inputs.py) and synthetic QA pairs, so no corpus build is needed on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import lora_model, run_cli, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


@pytest.fixture(scope="module")
def tok_dir(request) -> Path:
    prebuilt = os.environ.get("DOMAINLM_GPU_INPUTS")
    return Path(prebuilt) / "tokenizer" if prebuilt else request.getfixturevalue("tokenizer_dir")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok_dir) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("gpu") / "model", tok_dir)


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("gpuqa") / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"What is the signature of `pkg.fn{i}`?",
                                     "answer": f"`pkg.fn{i}(x, y={i})`"}) + "\n" for i in range(64)))
    return f


def sft(model, data, out, *extra):
    return ["finetune", "sft", "--model", model, "--data", data, "--output", out, "--train.device", "cuda",
            "--train.seq-len", 64, "--train.micro-batch-size", 8, "--train.global-batch-size", 16, "--log.every", 1,
            "--log.tensorboard", "false", "--valid-fraction", 0, *extra]


def test_compiled_kernels_in_hf_llama_bf16_match_the_torch_path(base):
    from domainlm.finetune.batches import collate
    from domainlm.finetune.chat import IGNORE, Encoded
    from domainlm.finetune.kernels import apply_kernels
    from domainlm.finetune.model import LossModel

    g = torch.Generator().manual_seed(0)

    def sample(n, learn):
        ids = torch.randint(4, 4000, (n,), generator=g).tolist()
        return Encoded(ids, [IGNORE] * (n - learn) + ids[n - learn:])

    enc = [sample(40, 12), sample(25, 9), sample(31, 20), sample(18, 6)]
    batches = [collate([[s] for s in enc[:2]], 0, packed=False), collate([enc[2:], enc[:1]], 0, packed=True)]

    def run(kernels: bool):
        model = lora_model(base, dtype=torch.bfloat16, device="cuda")
        if kernels:
            assert apply_kernels(model) == {"rms_norm": 5, "swiglu": 2, "rotary": 2, "lora_addmm": 14}
        lm = LossModel(model, fused=kernels)
        total = sum(lm(*(t.cuda() if t is not None else None for t in (b.input_ids, b.labels, b.attention_mask,
                                                                        b.position_ids))) for b in batches)
        count = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches)
        (total / count).backward()
        return float(total) / count, {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = run(False)
    loss, grads = run(True)
    assert abs(loss - loss_ref) <= 2e-2 * abs(loss_ref)
    for n, gr in grads_ref.items():
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), gr.flatten(), dim=0)
        assert cos > 0.99, (n, float(cos))


def test_bf16_autocast_without_the_input_cast_and_with_recompute_keeps_less_and_matches(base):
    """What `finetune --kernels triton` runs in bf16 (autocast, keep_input_dtype, recompute_elementwise)
    against the same model with peft's input cast and everything kept: the same loss and gradients
    (SDPA's backward may sum in another order on a GPU: cosine > 0.9999), and autograd keeps 5H + F
    values a token and layer fewer (6H + F where o_proj's input is SDPA's own output in flash layout)."""
    from domainlm.finetune.model import LossModel, keep_input_dtype
    from domainlm.pretrain.memory import saved_for_backward_bytes

    ids = torch.randint(4, 4000, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()

    def run(ours: bool):
        model = lora_model(base, dtype=torch.bfloat16, kernels=True, device="cuda")
        if ours:
            keep_input_dtype(model)
        lm = LossModel(model, fused=True, recompute=ours)

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return lm(ids, ids)

        kept = saved_for_backward_bytes(forward, exclude=list(model.parameters()))
        loss = forward()
        loss.backward()
        return kept, float(loss), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    kept_ref, loss_ref, grads_ref = run(False)
    kept, loss, grads = run(True)
    assert abs(loss - loss_ref) <= 1e-3 * abs(loss_ref)
    for n, gr in grads_ref.items():
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), gr.flatten(), dim=0)
        assert cos > 0.9999, (n, float(cos))
    h, f, layers, tokens = 64, 160, 2, ids.numel()
    assert kept_ref - kept in {layers * tokens * (5 * h + f) * 2, layers * tokens * (6 * h + f) * 2}


def test_lora_bf16_with_triton_kernels_trains_and_merges(base, qa, tmp_path, capsys):
    out = tmp_path / "adapter"
    code, _, err = run_cli(sft(base, qa, out, "--kernels", "triton", "--train.max-steps", 10, "--optim.lr", 5e-3), capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["training"]["precision"] == "bf16"
    assert m["kernels"]["used"] == {"rms_norm": 5, "swiglu": 2, "rotary": 2, "lora_addmm": 14}
    assert m["kernels"]["recompute_elementwise"] is True
    assert m["training"]["last_loss"] < m["training"]["first_loss"]
    code, _, err = run_cli(["finetune", "merge", "--adapter", out, "--output", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "merged/manifest.json").read_text())["verification"]["passed"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_qlora_trains_on_a_4bit_base_and_merges_into_the_dequantized_base(base, qa, tmp_path, capsys):
    out = tmp_path / "qlora"
    code, _, err = run_cli(sft(base, qa, out, "--method", "qlora", "--train.max-steps", 6, "--optim.lr", 5e-3), capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "qlora" and json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    code, _, err = run_cli(["finetune", "merge", "--adapter", out, "--output", tmp_path / "merged"], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "merged/manifest.json").read_text())
    assert merged["dtype"] == "bfloat16" and merged["verification"]["passed"]
    cfg = json.loads((tmp_path / "merged/config.json").read_text())
    assert "quantization_config" not in cfg                       # dense weights, not 4-bit
