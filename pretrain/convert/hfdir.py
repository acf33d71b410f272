"""The HF dir contract (ARCHITECTURE.md, "Contracts"): a Hugging Face causal-LM directory as
`convert to-hf` and `finetune merge` write it and every later stage reads it.

Writing: `write_safetensors`, `copy_tokenizer`, `generation_config`. Reading: `open_hf_dir`
returns an `HFDir` that has checked the directory is a loadable HF causal LM with safetensors
weights. Weights are read from safetensors only: a pickled `pytorch_model.bin` can run code when
loaded, so such a model is refused with the one-line way to re-save it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.manifest import MANIFEST, write_json
from domainlm.tokenizer.tokdir import TOKENIZER_FILES  # noqa: F401 (the one list; re-exported)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
CHAT_END = "<|im_end|>"


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` into `dst`; returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def load_tokenizer(path: Path, where: str):
    """transformers.AutoTokenizer of `path`, or UserError saying why it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's tokenizer files
        raise UserError(f"{where}: the tokenizer files do not load in transformers.AutoTokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def stop_ids(tok) -> list[int]:
    """Ids that end a generation: eos, and the chat template's end-of-turn token when it has one."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    end = tok.convert_tokens_to_ids(CHAT_END) if CHAT_END in tok.get_vocab() else None
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def generation_config(tok) -> dict[str, Any]:
    import transformers

    stops = stop_ids(tok)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": stops if len(stops) > 1 else (stops or [None])[0],
            "pad_token_id": tok.pad_token_id, "transformers_version": transformers.__version__}


# -- safetensors out ----------------------------------------------------------------------------


def write_safetensors(weights: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard: int) -> list[dict]:
    """Write `weights` (in order) as model.safetensors, or as shards no larger than `max_shard`
    bytes (a single larger tensor gets a shard of its own) with model.safetensors.index.json."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * itemsize
        if groups[-1] and size + nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    files = []
    weight_map = {}
    for i, names in enumerate(groups, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # A fresh contiguous tensor each: the q/k/v and gate/up views share the fused storage,
        # which safetensors refuses.
        tensors = {k: torch.empty(weights[k].shape, dtype=dtype).copy_(weights[k]) for k in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)          # safetensors creates it owner-only; serve it like the rest
        files.append({"name": fname, "bytes": (out / fname).stat().st_size, "tensors": len(names)})
        weight_map.update({k: fname for k in names})
        del tensors
    if n > 1:
        total = sum(weights[k].numel() for k in weight_map) * itemsize
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


# -- safetensors in -----------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise UserError(f"model {str(model_dir)!r} is not a directory; give a Hugging Face model directory")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        shown = ", ".join(sorted(p.name for p in model_dir.iterdir())[:5]) or "nothing"
        raise UserError(f"model {str(model_dir)!r} has no config.json (it holds {shown}), so it is not a "
                        "Hugging Face model directory")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from None


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header reads and whose tensors' bytes are all in the file (reads the
    header only); UserError naming the file otherwise (a download or a copy cut short)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        header, end = None, 0
    if header is None:
        raise UserError(f"{path}: not a readable safetensors file ({size:,} bytes; its header does not parse): "
                        "damaged or cut short, copy or download it again")
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated safetensors file: its tensors need {8 + n + end:,} bytes, the file has "
                        f"{size:,}; copy or download it again")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model dir, each with a complete header and data; UserError
    for pickle-only, missing or truncated weights."""
    files = _weight_files(model_dir)
    for f in files:
        check_safetensors(f)
    return files


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise UserError(f"{index} lists {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} "
                            "missing; download the whole model")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"model {str(model_dir)!r} has its weights only as pickle files ({', '.join(pickles[:3])}); domainlm "
            "reads safetensors only, as unpickling can run code: re-save it once where you trust the files, "
            "e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) (writes safetensors)")
    raise UserError(f"model {str(model_dir)!r} has no *.safetensors weights")


# -- the reader ---------------------------------------------------------------------------------

# model_type values whose weights and modules follow Llama's layout (q/k/v/o, gate/up/down, RMSNorm).
LLAMA_FAMILY = ("llama", "mistral")


@dataclass(slots=True)
class HFDir:
    """A checked Hugging Face causal-LM directory."""

    path: Path
    config: dict[str, Any]
    """config.json as parsed."""
    weights: list[Path]
    """The safetensors files."""
    manifest: dict[str, Any] | None = None
    """manifest.json when domainlm wrote the dir (convert to-hf, finetune merge), else None."""
    _sha256: str | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @property
    def is_llama_family(self) -> bool:
        return self.model_type in LLAMA_FAMILY

    @property
    def chat_template(self) -> str | None:
        """The chat template the tokenizer files carry (chat_template.jinja or tokenizer_config.json)."""
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        tc = self.path / "tokenizer_config.json"
        if tc.is_file():
            try:
                t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
            except ValueError:
                return None
            if isinstance(t, str):
                return t
        return None

    @property
    def max_positions(self) -> int | None:
        v = self.config.get("max_position_embeddings")
        return int(v) if v else None

    def weights_sha256(self) -> str:
        """sha256 over the weight files (names and bytes, in order): the model's identity for the
        adapters and indexes made from it."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for f in self.weights:
                h.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._sha256 = h.hexdigest()
        return self._sha256

    def tokenizer(self):
        """transformers.AutoTokenizer of this dir (UserError when it does not load)."""
        return load_tokenizer(self.path, f"model {str(self.path)!r}")

    def require_llama_family(self, what: str) -> None:
        if not self.is_llama_family:
            raise UserError(f"model {str(self.path)!r} is {self.architecture} (model_type {self.model_type!r}); "
                            f"{what} supports Llama-family models ({', '.join(LLAMA_FAMILY)})")

    def require_chat_template(self, what: str) -> str:
        t = self.chat_template
        if not t:
            raise UserError(f"model {str(self.path)!r} has no chat template (chat_template.jinja or "
                            f"tokenizer_config.json's chat_template); {what} needs one: give --chat-template "
                            f"FILE.jinja, or put the template in {str(self.path / 'chat_template.jinja')!r} "
                            "(from a GGUF: `domainlm convert from-gguf ... --chat-template FILE.jinja`)")
        return t


def open_hf_dir(path: str | Path) -> HFDir:
    """Check `path` is an HF causal-LM dir with safetensors weights; UserError naming what is wrong."""
    p = Path(path)
    cfg = read_config(p)
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise UserError(f"model {str(p)!r}: config.json names architectures {archs or 'none'}; "
                        "give a causal language model (…ForCausalLM), e.g. the output of `domainlm convert to-hf`")
    manifest = None
    if (p / MANIFEST).is_file():
        try:
            manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{p / MANIFEST}: not valid JSON ({e})") from None
    return HFDir(path=p, config=cfg, weights=weight_files(p), manifest=manifest)
