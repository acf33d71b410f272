"""A second, non-Python domain for `configs/pipelines/domain.yaml`: the Debian man pages (section 1).

Builds, from the gzipped pages under /usr/share/man/man1, the three files the domain pipeline takes,
so the pipeline can be checked on a domain it was never tuned on:

  corpus.jsonl     {"id": "<page name>", "text": "<the page rendered as plain text>"}, one line a page
  qa_train.jsonl   {"question", "answer", "doc_id"} about command-line options of the train pages
  qa_test.jsonl    the same about the test pages (no page has questions on both sides)
  manifest.json    the counts, the seed, the settings and the timings

Rendering: `groff -man -k -t -Tutf8 -P-c -P-b -P-u` (about 3x faster than `man -l`, which runs the
same pipeline with more around it), 100 columns, hyphenation off (so no word of the manual is cut in
two), at most --jobs processes at a time and a per-page --timeout; backspace overstrikes and ANSI
codes are stripped anyway. Pages whose source is a `.so` alias, that fail or time out to render, or
whose text is outside [--min-kb, --max-kb] are counted and skipped.

Questions: the option entries of the OPTIONS-like sections (and DESCRIPTION), i.e. a tag line such
as `       -x, --extract` or `       --color[=WHEN]` followed by an indented description, or a short
tag with its description on the same line (`       -c     with -lt: sort by ...`). Question:
"In `<page>`, what does the `<option>` option do?" (the long option when there is one); answer: the
first sentence of the description, whitespace collapsed, 20..300 characters, present verbatim in the
page's whitespace-collapsed text. Skipped: --help/--version-like options and any description shared
by more than --max-shared pages (e.g. the coreutils boilerplate); a test answer equal to any train
page's answer is dropped too.

Selection: the candidate pages are shuffled with --seed and rendered in fixed-size batches in that
order until --pages of them qualify (size in range and >= --min-qa questions); the first --pages
qualifying ones in the seeded order are kept. So the choice is deterministic for a given machine
(its set of installed pages and its groff). The pages are split (seeded) into --test-frac test
pages and the rest train; then --train questions are taken round-robin over the train pages (at
most --per-train-page each) and --test round-robin over the test pages (at most --per-test-page).

    .venv/bin/python bench/domain_manpages.py --output /tmp/manpages --pages 300 --train 400 --test 100 --seed 0
    domainlm run configs/pipelines/domain.yaml --var corpus=/tmp/manpages/corpus.jsonl \\
        --var qa_train=/tmp/manpages/qa_train.jsonl --var qa_test=/tmp/manpages/qa_test.jsonl --var workdir=runs/manpages

Only the standard library, groff and the installed man pages are needed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAN_DIR = Path("/usr/share/man/man1")
# Ahead of the page: make `.hy` a no-op and switch hyphenation off (man and mdoc pages both
# re-enable it in their setup macros; -rHY=0 only reaches the man ones).
PRELUDE = ".de hy\n..\n.nh\n"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
OVERSTRIKE = re.compile(r".\x08")
SECTION = re.compile(r"^[A-Z][A-Z0-9 ,/&()'_-]*$")
OPTION_SECTIONS = ("OPTION", "FLAG", "SWITCH", "ARGUMENT", "PARAMETER", "COMMAND LINE")
OTHER_SECTIONS = {"DESCRIPTION", "USAGE"}
OPT_TOKEN = re.compile(r"^(--?[A-Za-z0-9][A-Za-z0-9_+.#@-]*|-[?#@+])")
BORING_OPTIONS = {"--help", "--version", "--usage", "-?", "--help-all", "--long-help"}
BORING_ANSWER = re.compile(
    r"\b(display|print|show|output|give|list)s?\b[^.]{0,40}\b(help|usage|version)\b"
    r"|\b(help|usage|version)\b[^.]{0,12}\b(message|information|info|text|screen|summary)\b",
    re.I,
)
ABBREV = re.compile(r"(\b(e\.g|i\.e|etc|cf|vs|approx|resp|incl|min|max|no|fig|ch|sec|Dr|Mr|St)\.|\b[A-Za-z]\.)$", re.I)


def page_ids(files: list[Path]) -> dict[Path, str]:
    """Page name from `name.section.gz`; the section is kept only where two pages share a name."""
    def split(p: Path) -> tuple[str, str]:
        stem = p.name[:-3] if p.name.endswith(".gz") else p.name
        name, _, sect = stem.rpartition(".")
        return (name, sect) if name else (stem, "")
    names = Counter(split(p)[0] for p in files)
    return {p: (n if names[n] == 1 else f"{n}.{s}") for p in files for n, s in [split(p)]}


def render(path: Path, timeout: float) -> tuple[str | None, str]:
    """(text, "") or (None, reason)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except Exception as e:  # noqa: BLE001
        return None, f"unreadable: {type(e).__name__}"
    try:
        src = raw.decode("utf-8")
    except UnicodeDecodeError:
        src = raw.decode("latin-1")
    head = src.lstrip()[:200]
    if head.startswith(".so ") and src.count("\n") < 5:
        return None, "alias"
    cmd = ["groff", "-man", "-k", "-Kutf-8", "-t", "-Tutf8", "-P-c", "-P-b", "-P-u", "-rLL=100n", "-rHY=0"]
    try:
        r = subprocess.run(cmd, input=(PRELUDE + src).encode("utf-8"), capture_output=True, timeout=timeout,
                           env={**os.environ, "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        return None, "timeout"
    except OSError as e:
        return None, f"error: {e}"
    if r.returncode != 0 or not r.stdout.strip():
        return None, "render failed"
    text = r.stdout.decode("utf-8", "replace")
    text = OVERSTRIKE.sub("", ANSI.sub("", text))
    lines = [ln.rstrip() for ln in text.splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"
    return text, ""


def collapse(s: str) -> str:
    return " ".join(s.split())


def first_sentence(s: str) -> str:
    for m in re.finditer(r"[.!?](?=\s+[A-Z0-9(\"'`\u201c])|[.!?]$", s):
        if not ABBREV.search(s[: m.end()]):
            return s[: m.end()]
    return s


def option_name(tag: str) -> str | None:
    alts = [a.strip() for a in re.split(r",\s*|\s+\|\s+|\s+or\s+", tag) if a.strip()]
    opts = []
    for a in alts:
        m = OPT_TOKEN.match(a)
        if m:
            opts.append(m.group(1).rstrip(".-"))
        elif not opts:
            return None  # the tag does not start with an option
    longs = [o for o in opts if o.startswith("--") and len(o) > 2]
    name = longs[0] if longs else (opts[0] if opts else None)
    return name if name and len(name) >= 2 else None


def indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def options(text: str) -> list[tuple[str, str]]:
    """(option, description paragraph) pairs from the option entries of the page."""
    lines = text.split("\n")
    out: list[tuple[str, str]] = []
    in_section = False
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln and not ln.startswith(" ") and SECTION.match(ln):
            in_section = ln in OTHER_SECTIONS or any(k in ln for k in OPTION_SECTIONS)
            i += 1
            continue
        body = ln.lstrip(" ")
        if not (in_section and body.startswith("-") and len(body) > 1 and body[1] != " "):
            i += 1
            continue
        ind = indent(ln)
        m = re.search(r"\S(\s{2,})\S", body)  # same-line form: `-c     with -lt: ...`
        if m and m.start(1) <= 40:
            tag, desc_col = body[: m.start(1)], ind + m.end(1)
            desc = [body[m.end(1):]]
            j = i + 1
            while j < len(lines) and lines[j].strip() and indent(lines[j]) == desc_col:
                desc.append(lines[j].strip())
                j += 1
        else:
            tag = body
            j = i + 1
            if j + 1 < len(lines) and not lines[j].strip() and not lines[j + 1].lstrip().startswith("-"):
                j += 1  # `--flag=X`, a blank line, then the indented description (gcloud, .IP pages)
            if j >= len(lines) or not lines[j].strip() or indent(lines[j]) <= ind or len(tag) > 60:
                i += 1
                continue
            desc_col = indent(lines[j])
            desc = []
            while j < len(lines) and lines[j].strip() and indent(lines[j]) == desc_col:
                desc.append(lines[j].strip())
                j += 1
        name = option_name(tag.strip())
        if name and desc and not desc[0].startswith("-"):
            out.append((name, collapse(" ".join(desc))))
        i = max(j, i + 1)
    return out


def qa_candidates(page: str, text: str, min_len: int, max_len: int) -> list[dict]:
    """All the page's usable QA pairs, one per option, before the cross-page filters."""
    flat = collapse(text)
    seen: set[str] = set()
    out = []
    for opt, desc in options(text):
        if opt in seen or opt in BORING_OPTIONS:
            continue
        seen.add(opt)
        ans = first_sentence(desc).strip()
        if not (min_len <= len(ans) <= max_len) or ans not in flat:
            continue
        if sum(c.isalpha() for c in ans) < 0.5 * len(ans) or (len(ans) < 80 and BORING_ANSWER.search(ans)):
            continue
        out.append({"question": f"In `{page}`, what does the `{opt}` option do?", "answer": ans, "doc_id": page})
    return out


def norm(ans: str) -> str:
    return ans.lower().rstrip(".")


def round_robin(pages: list[str], qa: dict[str, list[dict]], n: int, per_page: int) -> list[dict]:
    out = []
    for k in range(per_page):
        for p in pages:
            if len(out) >= n:
                return out
            if k < len(qa[p]):
                out.append(qa[p][k])
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--man-dir", type=Path, default=MAN_DIR)
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-frac", type=float, default=0.2, help="share of the pages that are test pages")
    ap.add_argument("--per-train-page", type=int, default=4)
    ap.add_argument("--per-test-page", type=int, default=2)
    ap.add_argument("--min-qa", type=int, default=2, help="questions a page needs to be chosen")
    ap.add_argument("--min-kb", type=float, default=3.0)
    ap.add_argument("--max-kb", type=float, default=40.0)
    ap.add_argument("--min-answer", type=int, default=20)
    ap.add_argument("--max-answer", type=int, default=300)
    ap.add_argument("--max-shared", type=int, default=2, help="drop answers found on more pages than this")
    ap.add_argument("--exclude", nargs="*", default=["gcloud_"], metavar="PREFIX",
                    help="leave out pages whose file name starts with one of these (default: gcloud_, the "
                         "~16,600 generated pages of google-cloud-cli, which would otherwise be 93%% of man1); "
                         "`--exclude` with nothing keeps them")
    ap.add_argument("--jobs", type=int, default=2, help="render processes at a time (at most 2)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per page")
    ap.add_argument("--batch", type=int, default=0, help="pages rendered per batch (default: max(100, --pages))")
    a = ap.parse_args()
    jobs = max(1, min(2, a.jobs))
    if not shutil.which("groff"):
        print("groff is not installed", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    files = sorted(p for p in a.man_dir.iterdir() if p.name.endswith(".gz") and not p.is_symlink() and p.is_file())
    excluded = [p for p in files if any(p.name.startswith(x) for x in a.exclude)]
    files = [p for p in files if not any(p.name.startswith(x) for x in a.exclude)]
    ids = page_ids(files)
    # Cheap prefilter on the compressed size (3..40 KB of text is far inside 0.5..30 KB of gzip).
    sizes = {p: p.stat().st_size for p in files}
    cands = [p for p in files if 500 <= sizes[p] <= 30_000]
    random.Random(a.seed).shuffle(cands)
    print(f"{len(files)} pages in {a.man_dir} ({len(excluded)} more left out by --exclude, {len(cands)} candidates "
          f"after the size prefilter); rendering with {jobs} processes", flush=True)

    batch = a.batch or max(100, a.pages)
    lo, hi = int(a.min_kb * 1024), int(a.max_kb * 1024)
    rendered: list[tuple[str, str, list[dict]]] = []  # (id, text, candidate QA) of pages in range
    stats: Counter = Counter()
    pages_of_answer: dict[str, set[str]] = defaultdict(set)
    chosen: list[tuple[str, str, list[dict]]] = []
    pos = 0
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        while pos < len(cands):
            part = cands[pos: pos + batch]
            pos += len(part)
            tb = time.perf_counter()
            for p, (text, why) in zip(part, ex.map(lambda q: render(q, a.timeout), part)):
                stats["rendered"] += 1
                if text is None:
                    stats["skipped: " + why.split(":")[0]] += 1
                    continue
                n = len(text.encode("utf-8"))
                if not lo <= n <= hi:
                    stats["skipped: too small" if n < lo else "skipped: too large"] += 1
                    continue
                qa = qa_candidates(ids[p], text, a.min_answer, a.max_answer)
                for q in qa:
                    pages_of_answer[norm(q["answer"])].add(ids[p])
                rendered.append((ids[p], text, qa))
            # Qualifying pages, in the seeded order, with the shared-answer filter over all rendered.
            chosen = []
            for pid, text, qa in rendered:
                keep = [q for q in qa if len(pages_of_answer[norm(q["answer"])]) <= a.max_shared]
                if len(keep) >= a.min_qa:
                    chosen.append((pid, text, keep))
            el = time.perf_counter() - t0
            print(f"  rendered {stats['rendered']}/{len(cands)} ({len(part) / (time.perf_counter() - tb):.1f} pages/s), "
                  f"{len(rendered)} in size range, {len(chosen)} qualifying, {el:.0f}s", flush=True)
            if len(chosen) >= a.pages:
                break
    chosen = chosen[: a.pages]
    if len(chosen) < a.pages:
        print(f"warning: only {len(chosen)} pages qualify (asked for {a.pages})", file=sys.stderr)

    # Split by page, then sample questions round-robin over the pages.
    rng = random.Random(a.seed + 1)
    order = [pid for pid, _, _ in chosen]
    rng.shuffle(order)
    n_test = max(1, round(a.test_frac * len(order))) if len(order) > 1 else 0
    test_pages, train_pages = order[:n_test], order[n_test:]
    qa = {pid: list(q) for pid, _, q in chosen}
    for pid in order:
        rng.shuffle(qa[pid])
    train_answers = {norm(q["answer"]) for p in train_pages for q in qa[p]}
    leaked = 0
    for p in test_pages:
        before = len(qa[p])
        qa[p] = [q for q in qa[p] if norm(q["answer"]) not in train_answers]
        leaked += before - len(qa[p])
    train = round_robin(train_pages, qa, a.train, a.per_train_page)
    test = round_robin(test_pages, qa, a.test, a.per_test_page)
    questions = [q["question"] for q in train + test]
    assert len(questions) == len(set(questions)), "duplicate questions"
    assert not {q["doc_id"] for q in train} & {q["doc_id"] for q in test}, "a page on both sides"
    for name, got, want in (("train", len(train), a.train), ("test", len(test), a.test)):
        if got < want:
            print(f"warning: only {got} {name} questions (asked for {want})", file=sys.stderr)

    a.output.mkdir(parents=True, exist_ok=True)
    corpus = [{"id": pid, "text": text} for pid, text, _ in sorted(chosen)]
    write_jsonl(a.output / "corpus.jsonl", corpus)
    write_jsonl(a.output / "qa_train.jsonl", train)
    write_jsonl(a.output / "qa_test.jsonl", test)
    sizes_b = [len(d["text"].encode("utf-8")) for d in corpus]
    seconds = time.perf_counter() - t0
    groff_version = subprocess.run(["groff", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    manifest = {
        "seed": a.seed,
        "source": str(a.man_dir),
        "renderer": f"{groff_version}: groff -man -k -t -Tutf8 -P-c -P-b -P-u -rLL=100n -rHY=0 (hyphenation off)",
        "pages": len(corpus),
        "train_pages": len(train_pages),
        "test_pages": len(test_pages),
        "qa_train": len(train),
        "qa_test": len(test),
        "qa_available": {"train": sum(len(qa[p]) for p in train_pages), "test": sum(len(qa[p]) for p in test_pages)},
        "test_answers_dropped_as_in_train": leaked,
        "corpus_bytes": sum(sizes_b),
        "median_page_bytes": int(statistics.median(sizes_b)) if sizes_b else 0,
        "pages_in_dir": len(files) + len(excluded),
        "pages_excluded": {"prefixes": a.exclude, "count": len(excluded)},
        "candidates": len(cands),
        "render_stats": dict(sorted(stats.items())),
        "in_size_range": len(rendered),
        "seconds": round(seconds, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    (a.output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"pages {len(corpus)} ({len(train_pages)} train, {len(test_pages)} test), "
          f"{sum(sizes_b) / 1e6:.2f} MB, median page {manifest['median_page_bytes'] / 1024:.1f} KB; "
          f"QA {len(train)} train / {len(test)} test; rendered {stats['rendered']} "
          f"({', '.join(f'{k[9:]} {v}' for k, v in sorted(stats.items()) if k.startswith('skipped'))}); "
          f"{seconds:.1f}s -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
