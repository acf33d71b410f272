"""`domainlm finetune sft`, `finetune dpo` and `finetune merge`: thin entry points.

sft:   checks -> data -> model + adapters -> checks before -> train (checkpoints, SIGTERM) ->
       checks after -> adapter dir (trainer.py, output.py)
dpo:   the same with pairs, the start adapter and the reference log-probabilities (dpo.py, pairs.py)
merge: adapter dir -> its base (sha256 checked) -> merge -> written, reloaded, verified -> commit
"""

from __future__ import annotations

import time

from domainlm import stages
from domainlm.errors import UserError
from domainlm.finetune.config import DPOConfig, MergeConfig, SFTConfig
from domainlm.finetune.inputs import inputs_merge, refuse_full
from domainlm.manifest import StageOutput, make_manifest
from domainlm.progress import summary


def sft(cfg: SFTConfig) -> int:
    """Entry point of `domainlm finetune sft` (one process, or one rank under torchrun)."""
    from domainlm.finetune.trainer import Trainer

    return _train(Trainer(cfg))


def dpo(cfg: DPOConfig) -> int:
    """Entry point of `domainlm finetune dpo` (one process, or one rank under torchrun)."""
    from domainlm.finetune.dpo import DPOTrainer
    from domainlm.finetune.inputs import inputs_dpo

    return _train(DPOTrainer(cfg, inputs_dpo(cfg)))


def _train(trainer) -> int:
    try:
        trainer.setup()
        done = trainer.train()
        if done:
            trainer.finish()
        elif trainer.rank == 0:
            import signal

            summary(f"domainlm {trainer.stage}", [
                ("steps", f"{trainer.start_step} -> {trainer.step} of {trainer.total_steps} (stopped by "
                          f"{signal.Signals(trainer.stop_signal).name}; rerun the same command to resume)"),
                ("checkpoint", str(trainer.root))])
    finally:
        trainer.close()
    return 0


def merge(cfg: MergeConfig) -> dict:
    """Entry point of `domainlm finetune merge`."""
    from domainlm.finetune import merge as m
    from domainlm.finetune.adapter import ADAPTER_WEIGHTS, open_adapter_dir
    from domainlm.pretrain.convert.hfdir import check_safetensors
    from domainlm.pretrain.convert.verify import describe

    t0 = time.perf_counter()
    refuse_full(cfg.adapter)
    ad = open_adapter_dir(cfg.adapter)
    check_safetensors(ad.path / ADAPTER_WEIGHTS)
    hf = m.resolve_base(cfg, ad)
    quantized = ad.method == "qlora"
    if quantized:
        m.check_qlora_merge()
    max_shard = m.shard_bytes(cfg.max_shard_size)
    dtype = m.merged_dtype(cfg, hf, quantized)
    template = ad.chat_template or hf.require_chat_template("finetune merge")
    described = inputs_merge(cfg)
    with StageOutput(cfg.output, stages.FINETUNE_MERGE, overwrite=cfg.overwrite) as out:
        reference = m.reference_outputs(cfg, ad, hf, dtype, quantized, template) if cfg.verify else None
        files, params = m.write_merged(ad, hf, dtype, quantized, template, out.tmp, max_shard)
        report = m.verify(out.tmp, dtype, template, cfg, reference, "cuda" if quantized else "cpu") if cfg.verify else None
        if report is not None and not report["passed"]:
            raise UserError(f"verification failed, nothing written to {cfg.output!r}: {describe(report)}")
        manifest = make_manifest(stages.FINETUNE_MERGE, cfg, described, dtype=str(dtype).removeprefix("torch."),
                                 adapter={"path": str(ad.path), "method": ad.method,
                                          "fingerprint": ad.manifest.get("fingerprint")},
                                 base_model={"path": str(hf.path), "weights_sha256": hf.weights_sha256()},
                                 parameters=params, files=files, verification=report)
        out.commit(manifest)
    rows = [("adapter", f"{cfg.adapter} ({ad.method})"), ("base model", f"{hf.path} (weights sha256 checked)"),
            ("merged", f"{params:,} parameters, {str(dtype).removeprefix('torch.')}, {len(files)} safetensors file(s)"),
            ("verification", describe(report) if report else "skipped (--no-verify)")]
    rows += [(f"sample {r['prompt'][:24]!r}", repr(r["sample"][:100])) for r in (report or {}).get("prompts", [])]
    rows += [("output", cfg.output), ("time", f"{time.perf_counter() - t0:.1f}s")]
    summary("domainlm finetune merge", rows)
    return manifest
