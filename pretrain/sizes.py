"""Named model sizes. The files configs/model/NAME.yaml ARE the sizes; nothing here repeats them.

Each file is a pretrain config that holds only a `model:` section, so it runs as it is
(`domainlm pretrain --config configs/model/125M.yaml --data.shards ... --tokenizer ...`) and is
what `model.size: NAME` starts from in any other config. `sizes()` reads the folder into one
dict; adding a size is adding a file (or giving `model.size` a path to one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from domainlm.config import from_dict, read_yaml
from domainlm.errors import UserError

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# What a field left empty means when the size does not set it either.
DEFAULTS = {"rotary_base": 10000.0, "norm_eps": 1e-5, "tie_embeddings": False, "init_std": 0.02,
            "make_vocab_size_divisible_by": 128}
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def size_file(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"model.size: file {name!r} not found")
        return p
    p = MODEL_DIR / f"{name}.yaml"
    if not p.is_file():
        names = ", ".join(sorted(sizes())) or "none"
        raise UserError(f"model.size: no size {name!r}; named sizes: {names} (files in {MODEL_DIR}), "
                        "or give a path to a YAML file with a model: section")
    return p


def sizes() -> dict[str, dict]:
    """Every named size: NAME -> its model section."""
    return {p.stem: read_yaml(p).get("model", {}) for p in sorted(MODEL_DIR.glob("*.yaml"))}


def resolve_model(m):
    """A ModelArgs with every field filled: set fields, else the size's, else DEFAULTS."""
    from domainlm.pretrain.config import ModelArgs

    base = ModelArgs()
    if m.size:
        path = size_file(m.size)
        section = read_yaml(path).get("model")
        if not isinstance(section, dict):
            raise UserError(f"{path}: a model size file needs a `model:` section")
        section.pop("size", None)
        base = from_dict(ModelArgs, section, prefix="model.", source=str(path))
    values = {}
    for f in dataclasses.fields(ModelArgs):
        v = getattr(m, f.name)
        if v is None:
            v = getattr(base, f.name)
        if v is None:
            v = DEFAULTS.get(f.name)
        values[f.name] = v
    if values["num_query_groups"] is None and values["num_attention_heads"] is not None:
        values["num_query_groups"] = values["num_attention_heads"]
    missing = [k for k in REQUIRED if values[k] is None]
    if missing:
        raise UserError(f"model: {', '.join('model.' + k for k in missing)} not set; give model.size "
                        f"(one of {', '.join(sorted(sizes()))}) or set them")
    for k in REQUIRED + ("num_query_groups", "make_vocab_size_divisible_by"):
        if values[k] <= 0:
            raise UserError(f"model.{k} must be positive, got {values[k]}")
    return ModelArgs(**values)
