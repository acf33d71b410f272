"""The inputs of `finetune sft` and `finetune merge` as their manifests record them (what
`domainlm run` compares to decide whether a stage is up to date)."""

from __future__ import annotations

from pathlib import Path

from domainlm.errors import UserError
from domainlm.finetune.config import DPOConfig, MergeConfig, SFTConfig
from domainlm.manifest import describe_inputs


def _paths(specs: list[str], suffixes: tuple[str, ...] | None = None, kind: str = "JSON lines files") -> list[Path]:
    from domainlm.manifest import expand_inputs
    from domainlm.qa import split_spec

    out: list[Path] = []
    for spec in specs:
        path, _ = split_spec(spec)
        try:
            out += expand_inputs([path], suffixes, kind)
        except UserError as e:
            raise UserError(f"{spec!r}: {e}") from None
    return out


def inputs(cfg: SFTConfig) -> list[dict]:
    """The inputs as the manifest records them (the model dir by fingerprint or file hashes)."""
    from domainlm.corpus import CORPUS_SUFFIXES
    from domainlm.finetune.records import DATA_SUFFIXES
    from domainlm.pretrain.convert.hfdir import read_config
    from domainlm.qa import QA_SUFFIXES

    read_config(Path(cfg.model))
    paths = [Path(cfg.model)] + _paths(cfg.data, DATA_SUFFIXES) + _paths(cfg.valid_data, DATA_SUFFIXES)
    for name, extra, kind in (("points", cfg.points, "a points YAML file"),
                              ("chat_template", cfg.chat_template, "a Jinja chat template file")):
        if extra:
            if not Path(extra).is_file():
                raise UserError(f"{name} {extra!r}: no such file; give {kind}")
            paths.append(Path(extra))
    for spec in cfg.forgetting_data:     # a shards dir is named by its manifest's fingerprint
        paths += [Path(spec)] if (Path(spec) / "manifest.json").is_file() else _paths([spec], CORPUS_SUFFIXES, "corpus files")
    paths += _paths(cfg.eval.qa, QA_SUFFIXES)
    return describe_inputs(paths)


def inputs_dpo(cfg: DPOConfig) -> list[dict]:
    """`inputs` plus the adapter DPO starts from."""
    return inputs(cfg) + (describe_inputs([Path(cfg.adapter)]) if cfg.adapter else [])


def inputs_merge(cfg: MergeConfig) -> list[dict]:
    from domainlm.finetune.adapter import open_adapter_dir

    refuse_full(cfg.adapter)
    ad = open_adapter_dir(cfg.adapter)
    base = cfg.base or ad.base_model
    return describe_inputs([Path(cfg.adapter)] + ([Path(base)] if base and Path(base).is_dir() else []))


def refuse_full(path: str) -> None:
    import json

    m = Path(path) / "manifest.json"
    if m.is_file():
        try:
            method = json.loads(m.read_text(encoding="utf-8")).get("config", {}).get("method")
        except ValueError:
            return
        if method == "full":
            raise UserError(f"{path!r} is a full fine-tune, already a complete HF model dir (use it as it is): "
                            "there is no adapter to merge")
