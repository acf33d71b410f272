"""`domainlm serve` on a GPU (the GPU check): the engine on CUDA against stock transformers there,
and the GPU benchmark's code path. Skipped where no CUDA device is present."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_llama
from tests.test_serve import start_server

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_engine_on_cuda_matches_transformers_generate(tmp_path, tokenizer_dir):
    import openai
    from transformers import AutoModelForCausalLM

    from domainlm.pretrain.convert.hfdir import open_hf_dir, stop_ids

    model_dir = tiny_llama(tmp_path / "tiny", tokenizer_dir, max_position_embeddings=1024)
    server = start_server(["--model", model_dir, "--engine.device", "cuda", "--engine.dtype", "float32"])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        tok = open_hf_dir(model_dir).tokenizer()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).cuda().eval()
        for prompt in ("def parse(text):\n", "The module json", "numpy.sum(a, axis=None)"):
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=0)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].cuda()
            out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False, eos_token_id=stop_ids(tok),
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            out = out[:-1] if out and out[-1] in stop_ids(tok) else out
            assert got.choices[0].text == tok.decode(out, skip_special_tokens=True)
    finally:
        server.stop()


def test_gpu_benchmark_runs():
    """bench/serve.py --gpu: TTFT and tokens/s of the 125M model through the server."""
    r = subprocess.run([sys.executable, "bench/serve.py", "--gpu", "--tokens", "64"], cwd=REPO, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "time to first token" in r.stdout and "tokens/s" in r.stdout
