"""Where `domainlm compare`'s minutes go, on the prompts a finished comparison recorded.

    python bench/compare_breakdown.py                    # runs/demo (after `make demo`)
    python bench/compare_breakdown.py --run DIR --approaches rag sft+rag --batches 1

For each approach of the existing-base family, its recorded prompts (compare/approaches/*.jsonl,
in compare's order: sorted by length, in compare's batch size) go through the same model and dtype
as in compare, on --threads threads, batch by batch: once as the prompt's forward pass alone (the prefill,
logits of the last position only, as `generate` computes them), once through the harness's
`Generator.generate` (prefill + greedy decoding). The share of the prefill says what a faster
decoder could save. For the adapter rows the same batches also go through peft's own LoRA forward
(`Generator(fuse_lora=False)`; compare runs each adapter's product inside one addmm), prefill and
generate, in rotating order batch by batch, the answers compared; and the prefill with the adapter
merged into the weights (peft's `merge_and_unload`, what serving a merged model would run; not
what compare does: merging moves the logits by ~1e-5 in fp32 and rounds the update away in bf16).
Padding: the prompt tokens a batch computes over the prompts' own tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

ADAPTER = {"sft": "sft", "sft+rag": "sft_rag", "sft+dpo": "sft_dpo"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs/demo"), help="a pipeline workdir with a finished compare/")
    ap.add_argument("--approaches", nargs="+", default=["zero-shot", "few-shot", "rag", "sft", "sft+dpo", "sft+rag"])
    ap.add_argument("--batches", type=int, default=1, help="batches per approach (0: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (compare's gen.threads; the demo's 2)")
    ap.add_argument("--output", default=str(REPO / "bench/results/compare_breakdown.txt"))
    ns = ap.parse_args()

    import torch

    from domainlm.eval.compare import record_file
    from domainlm.eval.generate import Generator, cpu_threads
    from machine import describe

    run = Path(ns.run)
    manifest = json.loads((run / "compare" / "manifest.json").read_text())
    report = json.loads((run / "compare" / "compare.json").read_text())
    cfg = manifest["config"]
    inputs, gen_cfg = cfg["inputs"], cfg["gen"]
    batch = gen_cfg["batch_size"]
    dtype = getattr(torch, report["dtype"])       # what compare ran in (its gen.dtype on this CPU)
    lines = [describe(), f"load average at start: {os.getloadavg()[0]:.2f}",
             f"compare of {run}: {report['questions']} questions, batch {batch}, {str(dtype).removeprefix('torch.')}, "
             f"threads {ns.threads}, <= {gen_cfg['max_new_tokens']} new tokens"]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    with cpu_threads(ns.threads), torch.inference_mode():
        base = None
        for name in ns.approaches:
            recs = [json.loads(x) for x in open(run / "compare" / "approaches" / record_file(name), encoding="utf-8")]
            adapter = inputs.get(ADAPTER[name]) if name in ADAPTER else None
            if adapter:
                gen = Generator(inputs["model"], adapter, dtype=dtype)
            else:
                base = base or Generator(inputs["model"], dtype=dtype)
                gen = base
            prompts = sorted((r["prompt"] for r in recs), key=lambda p: len(gen.prompt_ids(p)))
            groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
            groups = groups[: ns.batches] if ns.batches else groups
            sides = {"ours": gen}
            if adapter:     # peft's own LoRA forward and the merged weights, batch by batch beside ours
                sides["peft"] = Generator(inputs["model"], adapter, dtype=dtype, fuse_lora=False)
                sides["merged"] = Generator(inputs["model"], adapter, dtype=dtype, fuse_lora=False)
                sides["merged"].model = sides["merged"].model.merge_and_unload()
            pre = dict.fromkeys(sides, 0.0)
            full = dict.fromkeys(("ours", "peft") if adapter else ("ours",), 0.0)
            same, own, padded = True, 0, 0
            for b, group in enumerate(groups):
                ids, mask = _batch(gen, group)
                own += int(mask.sum())
                padded += ids.numel()
                order = list(sides)[b % len(sides):] + list(sides)[: b % len(sides)]     # rotating
                for side in order:
                    t0 = time.perf_counter()
                    sides[side].model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                    pre[side] += time.perf_counter() - t0
                answers = {}
                for side in [s for s in order if s in full]:
                    t0 = time.perf_counter()
                    answers[side] = [g.text for g in sides[side].generate(group, max_new_tokens=gen_cfg["max_new_tokens"],
                                                                         batch_size=batch)]
                    full[side] += time.perf_counter() - t0
                same = same and len({tuple(a) for a in answers.values()}) == 1
            line = (f"{name}: {len(groups)} batch(es), prompt tokens {own:,} ({padded / own:.3f}x with padding); "
                    f"prefill {pre['ours']:.2f} s ({padded / pre['ours']:,.0f} tokens/s), generate {full['ours']:.2f} s, "
                    f"prefill share {min(1.0, pre['ours'] / full['ours']):.2f}")
            if adapter:
                line += (f"; through peft's LoRA forward: prefill {pre['peft']:.2f} s, generate {full['peft']:.2f} s "
                         f"(ours, the adapter in one addmm: {pre['peft'] / pre['ours']:.2f}x and "
                         f"{full['peft'] / full['ours']:.2f}x; the same answers: {same}); the adapter merged into "
                         f"the weights: prefill {pre['merged']:.2f} s ({pre['peft'] / pre['merged']:.2f}x peft's)")
            del sides
            emit(line)
    emit(f"load average at end: {os.getloadavg()[0]:.2f}")
    Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.output).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _batch(gen, group):
    import torch

    encoded = [gen.prompt_ids(m) for m in group]
    width, pad = max(map(len, encoded)), gen.tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


if __name__ == "__main__":
    main()
