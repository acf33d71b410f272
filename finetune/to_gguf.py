"""The entry point of `domainlm convert to-gguf`: an adapter merged first, then the GGUF export.

The export itself is pretrain's (`pretrain/convert/gguf_export.py`: HF dir -> GGUF, verified).
An adapter is a fine-tuning output, and pretrain does not import finetune (the layering), so
the command starts here: without --adapter it hands the HF dir to the export as it is; with
--adapter it refuses an adapter of another base (`AdapterDir.check_base`, by the weights'
sha256) before any work, then merges it with `finetune merge` itself (peft's merge_and_unload,
written through the HF dir contract and verified against base + adapter by logits, on the
export's check prompts) into a hidden folder beside the output, exports that merged dir, and
removes the folder whatever happened.
"""

from __future__ import annotations

import time
from typing import Any


def to_gguf(cfg) -> dict[str, Any]:
    """Entry point of `domainlm convert to-gguf` (cfg: `pretrain.convert.config.ToGGUFConfig`)."""
    from domainlm.pretrain.convert.gguf_export import Staging, check_model, check_output, check_outtype, export

    if not cfg.adapter:
        return export(cfg)
    from domainlm.finetune.adapter import open_adapter_dir
    from domainlm.finetune.command import merge
    from domainlm.finetune.config import MergeChecks, MergeConfig
    from domainlm.finetune.inputs import refuse_full
    from domainlm.pretrain.convert.verify import describe

    out = check_output(cfg)                       # the cheap refusals first, as without an adapter
    hf = check_model(cfg.model)
    check_outtype(hf.config, cfg.outtype, f"model {cfg.model!r}")
    refuse_full(cfg.adapter)
    adapter = open_adapter_dir(cfg.adapter)
    adapter.check_base(hf)
    with Staging(out) as staging:
        t0 = time.perf_counter()
        merged_dir = staging.dir / "merged"
        checks = MergeChecks(prompts=list(cfg.checks.prompts), new_tokens=cfg.checks.new_tokens)
        manifest = merge(MergeConfig(adapter=cfg.adapter, base=cfg.model, output=str(merged_dir), dtype="auto",
                                     verify=cfg.verify, checks=checks))
        report = manifest.get("verification")
        merged = {"method": adapter.method, "dtype": manifest.get("dtype"), "verification": report,
                  "line": describe(report) if report else "not verified (--no-verify)",
                  "seconds": time.perf_counter() - t0}
        return export(cfg, model_dir=str(merged_dir), merged=merged, staging=staging)
