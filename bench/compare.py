"""The evaluation harness's own cost: batched generation across questions against a plain loop of
`generate` calls over the same questions (issue 14: >= 2x faster at batch 16 on CPU, identical
greedy answers).

    python bench/compare.py                       # the demo model (runs/demo/hf), 128 pydoc test questions
    python bench/compare.py --model DIR --data QA.jsonl:test --questions 256 --repeats 5

Both sides answer the same questions with the same chat-template prompts, greedy, up to
--new-tokens tokens, stopping at eos or <|im_end|>, in the same process with the same torch thread
count, interleaved over --repeats rounds (order rotating); medians are compared. The loop is what a
user writes first: for each question, apply_chat_template, model.generate, decode. Ours is
`domainlm.eval.generate.Generator` (left-padded batches of --batch-size, sorted by length).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "runs/demo/hf"))
    ap.add_argument("--data", default=str(REPO / "runs/demo/corpus/qa.jsonl") + ":test")
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (0: torch's default)")
    ap.add_argument("--output", default=str(REPO / "bench/results/compare.txt"))
    ns = ap.parse_args()

    import torch

    from domainlm.eval.generate import Generator
    from domainlm.pretrain.convert.hfdir import stop_ids
    from domainlm.qa import read_qa, sample
    from machine import describe

    if ns.threads:
        torch.set_num_threads(ns.threads)
    lines = [describe(), f"load average at start: {os.getloadavg()[0]:.2f}", f"torch threads: {torch.get_num_threads()}"]
    gen = Generator(ns.model)
    items = sample(read_qa(ns.data), ns.questions, 0)
    prompts = [[{"role": "user", "content": qa.question}] for qa in items]
    tok, model, stops = gen.tok, gen.model, stop_ids(gen.tok)

    tokens: dict[str, int] = {}

    def loop() -> list[str]:
        out, n_tok = [], 0
        with torch.inference_mode():
            for p in prompts:
                ids = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                g = model.generate(input_ids=torch.tensor([list(ids)]), max_new_tokens=ns.new_tokens, do_sample=False,
                                   eos_token_id=stops, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
                n = next((i + 1 for i, t in enumerate(g) if t in stops), len(g))
                n_tok += n
                out.append(tok.decode([t for t in g[:n] if t not in stops], skip_special_tokens=True).strip())
        tokens["loop of generate"] = n_tok
        return out

    def batched() -> list[str]:
        gens = gen.generate(prompts, max_new_tokens=ns.new_tokens, batch_size=ns.batch_size)
        tokens[f"harness, batch {ns.batch_size}"] = sum(g.tokens_out for g in gens)
        return [g.text for g in gens]

    runs: dict[str, list[float]] = {"loop of generate": [], f"harness, batch {ns.batch_size}": []}
    answers: dict[str, list[str]] = {}
    fns = list(zip(runs, (loop, batched)))
    loop(), batched()                       # warm-up (allocator, first-call costs)
    for r in range(ns.repeats):
        for name, fn in fns[r % 2:] + fns[: r % 2]:
            t0 = time.perf_counter()
            answers[name] = fn()
            runs[name].append(time.perf_counter() - t0)
    a, b = runs
    same = answers[a] == answers[b]
    differ = sum(x != y for x, y in zip(answers[a], answers[b]))
    lines.append(f"model {ns.model}, {len(items)} questions ({ns.data}), greedy, <= {ns.new_tokens} new tokens, "
                 f"{ns.repeats} interleaved rounds")
    for name, ts in runs.items():
        lines.append(f"{name}: median {statistics.median(ts):.2f} s, min {min(ts):.2f} s, runs "
                     + ", ".join(f"{t:.2f}" for t in ts) + f"; {len(items) / statistics.median(ts):.1f} questions/s, "
                     f"{tokens[name] / statistics.median(ts):.1f} generated tokens/s ({tokens[name]} tokens)")
    ratio = statistics.median(runs[a]) / statistics.median(runs[b])
    lines.append(f"speed-up (median loop / median harness): {ratio:.2f}x (goal >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    lines.append(f"identical answers: {same} ({differ} of {len(items)} differ)")
    lines.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines)
    print(text)
    Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.output).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
