"""The streaming loader (pretrain/loader.py): reading, rank split, packing, shuffle, blending,
exact resume, validation and the errors a user can meet.

Shard dirs are written here with the real format (data/shards.py's ShardWriter and a
manifest with the fields the loader reads). Every document's token ids are unique in its dir,
so a document is recognized wherever it lands in a window.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from domainlm.errors import UserError
from domainlm.data import shards as shards_contract
from domainlm.pretrain import loader_plan
from domainlm.pretrain.loader import DataArgs, TokenWindowLoader
from domainlm.data.shards import SHARD_PATTERN, ShardWriter, npy_bytes, sample_key

EOS = 2
SHA = "ab" * 32


def make_shards(root: Path, splits: dict[str, list[list[np.ndarray]]], *, vocab_size: int = 65536,
                sha: str = SHA, dtype: str = "uint16") -> Path:
    """A shards dir in the real format: one tar per inner list, manifest with checksums."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": "data shard",
        "tokenizer": {"sha256": sha, "vocab_size": vocab_size, "eos_id": EOS, "bos_id": 1, "pad_id": 3,
                      "path": "tokenizer"},
        "token_dtype": dtype,
        "splits": {},
        "dropped": {},
    }
    for split, shards in splits.items():
        (root / split).mkdir(exist_ok=True)
        entries = []
        for i, docs in enumerate(shards):
            name = f"{split}/{SHARD_PATTERN.format(index=i)}"
            with open(root / name, "wb") as f, ShardWriter(f) as w:
                for j, d in enumerate(docs):
                    doc_id = f"{split}-{i}-{j}"
                    w.write(sample_key(doc_id, "corpus.jsonl"), np.asarray(d, dtype),
                            {"id": doc_id, "source": f"corpus.jsonl:{j}", "tokens": len(d)})
            data = (root / name).read_bytes()
            entries.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                            "documents": len(docs), "tokens": int(sum(len(d) for d in docs))})
        manifest["splits"][split] = {"documents": sum(e["documents"] for e in entries),
                                     "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def unique_docs(n_shards: int, docs_per_shard: int, *, start: int = 10, max_len: int = 40,
                seed: int = 0) -> list[list[np.ndarray]]:
    """Shards of documents whose token ids never repeat (one empty document included)."""
    rng = np.random.default_rng(seed)
    nxt = start
    shards = []
    for i in range(n_shards):
        docs = []
        for j in range(docs_per_shard):
            n = 0 if (i, j) == (0, 1) else int(rng.integers(1, max_len))
            docs.append(np.arange(nxt, nxt + n))
            nxt += n
        shards.append(docs)
    return shards


def stream_of(windows: list[torch.Tensor], seq_len: int) -> np.ndarray:
    """The token stream the windows were cut from, checking that consecutive windows overlap by
    exactly one token (window i = stream[i*L : i*L + L + 1])."""
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]
    return np.concatenate([w[:seq_len].numpy() for w in windows] + [windows[-1][-1:].numpy()])


def split_docs(stream: np.ndarray) -> list[tuple[int, ...]]:
    """Documents of a stream that ends with an eos."""
    assert stream[-1] == EOS
    cuts = np.flatnonzero(stream == EOS)
    return [tuple(d[:-1].tolist()) for d in np.split(stream, cuts + 1)[:-1]]


def windows(loader: TokenWindowLoader, n: int) -> list[torch.Tensor]:
    return [row for batch in itertools.islice(iter(loader), n) for row in batch]


def args(*dirs: Path, **kw) -> DataArgs:
    kw.setdefault("num_workers", 0)
    return DataArgs(shards=[str(d) for d in dirs], **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loader")
    train = unique_docs(3, 25)
    valid = unique_docs(2, 10, start=20000)
    return {
        "train": train,
        "dir": make_shards(root / "a", {"train": train, "valid": valid}),
        "b": make_shards(root / "b", {"train": unique_docs(2, 12, start=40000), "valid": unique_docs(1, 5, start=50000)}),
        "root": root,
    }


# ---------------------------------------------------------------------------------------------
# Reading


def test_reader_agrees_with_stock_webdataset(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 70000, int(rng.integers(0, 300))).astype(np.uint32) for _ in range(40)]
    path = tmp_path / "shard.tar"
    with open(path, "wb") as f, ShardWriter(f) as w:
        for i, d in enumerate(docs):
            # long ids make keys that fill the ustar name field, as real source ids do
            w.write(sample_key(f"some/long/path/to/a/source/file/number/{i}.jsonl#record-{i}" * 2, "x"), d, {"i": i})
    entry = shards_contract.ShardEntry(str(path), "shard.tar", path.stat().st_size, len(docs), sum(map(len, docs)), "")
    idx = shards_contract.index_shard(entry, np.dtype("uint32"))
    stock = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert len(stock) == len(docs) == len(idx.counts)
    for i, sample in enumerate(stock):
        assert sample["json"] == {"i": i}
        np.testing.assert_array_equal(idx.doc(i), sample["npy"])
        np.testing.assert_array_equal(idx.doc(i), docs[i])


def test_reader_falls_back_to_tarfile_for_gnu_long_names(tmp_path):
    import webdataset as wds

    docs = [np.arange(i, i + 7, dtype=np.uint16) for i in range(5)]
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, d in enumerate(docs):
            for ext, payload in (("npy", npy_bytes(d)), ("json", b"{}")):
                info = tarfile.TarInfo(f"{'k' * 120}{i}.{ext}")  # > 100 chars: a GNU 'L' header
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    entry = shards_contract.ShardEntry(str(path), "gnu.tar", path.stat().st_size, 5, 35, "")
    idx = shards_contract.index_shard(entry, np.dtype("uint16"))
    stock = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["npy"].tolist() for s in stock] == [idx.doc(i).tolist() for i in range(5)]


# ---------------------------------------------------------------------------------------------
# Order: ranks, packing, shuffle


@pytest.mark.parametrize("dp_size,workers", [(1, 0), (2, 0), (2, 2), (5, 0)])
def test_ranks_disjoint_and_complete_over_an_epoch(data, dp_size, workers):
    """Every token of every document, and the eos after it, appears exactly once in epoch 0 of
    the ranks' streams together (5 ranks > 3 shards: shards are cut into pieces)."""
    L = 8
    seen: list[tuple[int, ...]] = []
    for rank in range(dp_size):
        loader = TokenWindowLoader(args(data["dir"], shuffle_buffer=4, num_workers=workers), split="train",
                                   seq_len=L, micro_batch_size=1, dp_rank=rank, dp_size=dp_size)
        wins, states = [], []
        for batch in loader:
            wins.append(batch[0])
            states.append(loader.state_dict()["sources"][0])
            if states[-1]["epoch"] == 1:
                break
        stream = stream_of(wins, L)
        epoch1_start = len(wins) * L - states[-1]["epoch_tokens"]
        seen += split_docs(stream[:epoch1_start])
    every = [tuple(d.tolist()) for shard in data["train"] for d in shard]
    assert sorted(seen) == sorted(every)


def test_workers_do_not_change_the_order(data):
    def first(workers: int) -> list[torch.Tensor]:
        loader = TokenWindowLoader(args(data["dir"], data["b"], shuffle_buffer=3, num_workers=workers),
                                   split="train", seq_len=16, micro_batch_size=4, dp_rank=1, dp_size=2)
        return list(itertools.islice(iter(loader), 40))

    for a, b in zip(first(0), first(3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seq_len", [1, 7, 64, 2000])
def test_packing_matches_reference_concatenation(tmp_path, seq_len):
    """No shuffle, one shard, one rank: windows are slices of the documents, as stock webdataset
    reads them, joined with eos, epoch after epoch (seq_len 2000 > an epoch: windows span epochs)."""
    import webdataset as wds

    docs = unique_docs(1, 30)[0]
    d = make_shards(tmp_path / "s", {"train": [docs]})
    stock = [s["npy"] for s in wds.WebDataset(str(d / "train" / "shard-000000.tar"), shardshuffle=False).decode()]
    assert [x.tolist() for x in stock] == [x.tolist() for x in docs]
    epoch = np.concatenate([np.append(x, EOS) for x in stock])
    ref = np.tile(epoch, 4 + (3 * seq_len) // len(epoch))
    loader = TokenWindowLoader(args(d, shuffle_buffer=1), split="train", seq_len=seq_len, micro_batch_size=3)
    batches = list(itertools.islice(iter(loader), (len(ref) - 1) // (3 * seq_len)))
    assert batches and all(b.dtype == torch.int64 and b.shape == (3, seq_len + 1) for b in batches)
    for i, row in enumerate(r for b in batches for r in b):
        np.testing.assert_array_equal(row.numpy(), ref[i * seq_len: i * seq_len + seq_len + 1])


def epoch_docs(loader: TokenWindowLoader, epochs: int) -> list[list[tuple[int, ...]]]:
    """Per epoch, the documents of a one-rank stream in the order the loader gives them."""
    L = loader.seq_len
    wins, marks = [], []
    for batch in loader:
        wins.append(batch[0])
        st = loader.state_dict()["sources"][0]
        marks.append((st["epoch"], len(wins) * L - st["epoch_tokens"]))
        if st["epoch"] == epochs:
            break
    stream = stream_of(wins, L)
    starts = [0] + [next(p for e, p in marks if e == k) for k in range(1, epochs + 1)]
    return [split_docs(stream[a:b]) for a, b in zip(starts, starts[1:])]


def test_shuffle_is_seeded_and_new_every_epoch(data):
    def run(seed: int) -> list[list[tuple[int, ...]]]:
        loader = TokenWindowLoader(args(data["dir"], shuffle_buffer=16, seed=seed), split="train",
                                   seq_len=32, micro_batch_size=1)
        return epoch_docs(loader, 2)

    a, again, other = run(5), run(5), run(6)
    assert a == again
    assert a[0] != other[0]
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])
    stored = [tuple(d.tolist()) for shard in data["train"] for d in shard]
    assert a[0] != stored and sorted(a[0]) == sorted(stored)
    # the shard order itself is reshuffled each epoch (seen with no document shuffle)
    unshuffled = TokenWindowLoader(args(data["dir"], shuffle_buffer=1), split="train", seq_len=32, micro_batch_size=1)
    first_docs = {tuple(shard[0].tolist()): i for i, shard in enumerate(data["train"])}
    orders = {tuple(first_docs[d] for d in epoch if d in first_docs) for epoch in epoch_docs(unshuffled, 6)}
    assert len(orders) > 1


# ---------------------------------------------------------------------------------------------
# Resume


def _loader(data, workers=0, **kw) -> TokenWindowLoader:
    return TokenWindowLoader(args(data["dir"], data["b"], shuffle_buffer=5, num_workers=workers, weights=[2, 1]),
                             split="train", seq_len=16, micro_batch_size=3, dp_rank=1, dp_size=2, **kw)


def test_resume_is_exact_across_epochs(data):
    full = list(itertools.islice(iter(_loader(data)), 80))
    ref = _loader(data)
    list(itertools.islice(iter(ref), 80))
    assert all(s["epoch"] >= 2 for s in ref.state_dict()["sources"]), "the run should cross epoch boundaries"
    for k in (0, 1, 13, 37, 61):
        first = _loader(data)
        list(itertools.islice(iter(first), k))
        state = json.loads(json.dumps(first.state_dict()))
        second = _loader(data)
        second.load_state_dict(state)
        for got, want in zip(itertools.islice(iter(second), 10), full[k:k + 10]):
            assert torch.equal(got, want)


def test_resume_with_workers_and_another_worker_count(data):
    full = list(itertools.islice(iter(_loader(data)), 50))
    first = _loader(data, workers=2)
    it = iter(first)
    got = [next(it) for _ in range(29)]
    state = first.state_dict()
    first.close()  # workers stop; the iteration goes on in-process, unaffected
    more = [next(it) for _ in range(21)]
    for a, b in zip(got + more, full):
        assert torch.equal(a, b)
    for workers in (0, 1):
        second = _loader(data, workers=workers)
        second.load_state_dict(state)
        for a, b in zip(itertools.islice(iter(second), 21), full[29:]):
            assert torch.equal(a, b)


def test_iterating_again_continues_the_stream(data):
    full = list(itertools.islice(iter(_loader(data)), 20))
    loader = _loader(data)
    part = list(itertools.islice(iter(loader), 8)) + list(itertools.islice(iter(loader), 12))
    assert all(torch.equal(a, b) for a, b in zip(part, full))


def test_resume_rebuilds_only_the_current_block(data, monkeypatch):
    """Restoring reads from the position, not by replaying what was consumed."""
    calls = []
    real = loader_plan.SourcePlan.build_block
    monkeypatch.setattr(loader_plan.SourcePlan, "build_block",
                        lambda self, e, b: calls.append((self.source, e, b)) or real(self, e, b))
    loader = TokenWindowLoader(args(data["dir"], shuffle_buffer=4), split="train", seq_len=16, micro_batch_size=2)
    list(itertools.islice(iter(loader), 400))
    consumed = len(calls)
    state = loader.state_dict()
    assert state["sources"][0]["epoch"] >= 5
    calls.clear()
    again = TokenWindowLoader(args(data["dir"], shuffle_buffer=4), split="train", seq_len=16, micro_batch_size=2)
    again.load_state_dict(state)
    next(iter(again))
    assert consumed > 100 and len(calls) <= 2


def test_resume_refuses_a_different_order(data):
    state = _loader(data).state_dict()
    other = TokenWindowLoader(args(data["dir"], data["b"], shuffle_buffer=5, weights=[2, 1]), split="train",
                              seq_len=16, micro_batch_size=3, dp_rank=1, dp_size=4)
    with pytest.raises(UserError, match=r"dp_size 2 \(now 4\)"):
        other.load_state_dict(state)
    reseeded = TokenWindowLoader(args(data["dir"], data["b"], shuffle_buffer=5, seed=9), split="train",
                                 seq_len=16, micro_batch_size=3, dp_rank=1, dp_size=2)
    with pytest.raises(UserError, match="seed 1234"):
        reseeded.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Blending


def _source_of(window: torch.Tensor) -> int:
    return int(window.max() >= 40000)


@pytest.mark.parametrize("weights,expect", [([0.7, 0.3], 0.3), ([], None)])
def test_blend_weights_within_tolerance(data, weights, expect):
    loader = TokenWindowLoader(args(data["dir"], data["b"], weights=weights, shuffle_buffer=8), split="train",
                               seq_len=4, micro_batch_size=16)
    if expect is None:  # default: in proportion to each dir's train tokens
        tokens = [json.loads((d / "manifest.json").read_text())["splits"]["train"]["tokens"] for d in (data["dir"], data["b"])]
        expect = tokens[1] / sum(tokens)
    wins = windows(loader, 250)
    share = np.mean([_source_of(w) for w in wins])
    assert abs(share - expect) < 0.025, (share, expect)


# ---------------------------------------------------------------------------------------------
# Validation split


def test_valid_split_is_finite_and_the_same_every_time(data):
    def make(seed: int) -> TokenWindowLoader:
        return TokenWindowLoader(args(data["dir"], seed=seed, shuffle_buffer=4), split="valid", seq_len=8,
                                 micro_batch_size=2, infinite=False)

    loader = make(1)
    first, second = list(loader), list(loader)
    third = list(make(2))  # the training seed does not move the validation windows
    assert len(first) == len(loader) > 3
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, third))
    valid_tokens = json.loads((data["dir"] / "manifest.json").read_text())["splits"]["valid"]
    stream_len = valid_tokens["tokens"] + valid_tokens["documents"]
    assert len(first) == ((stream_len - 1) // 8) // 2
    with pytest.raises(TypeError):
        len(_loader(data))


# ---------------------------------------------------------------------------------------------
# What a user can get wrong


def test_vocab_and_tokenizer_mismatch_name_both(data):
    with pytest.raises(UserError, match=r"vocab size 32000\) .* vocab size 65536"):
        TokenWindowLoader(args(data["dir"]), split="train", seq_len=8, micro_batch_size=1, vocab_size=32000)
    with pytest.raises(UserError, match=r"sha256 cdcdcdcdcdcd.*sha256 abababababab"):
        TokenWindowLoader(args(data["dir"]), split="train", seq_len=8, micro_batch_size=1, tokenizer_sha256="cd" * 32)
    ok = TokenWindowLoader(args(data["dir"]), split="train", seq_len=8, micro_batch_size=1, vocab_size=65536,
                           tokenizer_sha256=SHA)
    assert (ok.vocab_size, ok.eos_id, ok.tokenizer_sha256) == (65536, EOS, SHA)


def test_blend_of_two_tokenizers_is_refused(data):
    other = make_shards(data["root"] / "other_tok", {"train": unique_docs(1, 3)}, sha="ef" * 32, vocab_size=8064)
    with pytest.raises(UserError, match=r"other_tok.*built with another tokenizer"):
        TokenWindowLoader(args(data["dir"], other), split="train", seq_len=8, micro_batch_size=1)


def test_bad_shards_dirs(data, tmp_path):
    def load(d: Path, split: str = "train") -> None:
        loader = TokenWindowLoader(args(d), split=split, seq_len=8, micro_batch_size=1)
        next(iter(loader))

    with pytest.raises(UserError, match="has no manifest.json"):
        load(tmp_path)
    d = make_shards(tmp_path / "novalid", {"train": unique_docs(1, 3)})
    with pytest.raises(UserError, match=r"no 'valid' tokens: it was built with --valid-fraction 0, or its corpus "
                                        r"is too small for its fraction.*--eval.every 0"):  # either cause
        load(d, "valid")
    gone = make_shards(tmp_path / "gone", {"train": unique_docs(2, 3)})
    (gone / "train" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match=r"shard-000001.tar.* is missing"):
        load(gone)
    cut = make_shards(tmp_path / "cut", {"train": unique_docs(1, 3)})
    tar = cut / "train" / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])
    with pytest.raises(UserError, match="bytes, the manifest says"):
        load(cut)
    lying = make_shards(tmp_path / "lying", {"train": unique_docs(1, 3)})
    m = json.loads((lying / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["documents"] = 4
    (lying / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="holds 3 documents .* lists 4"):
        load(lying)
    oov = make_shards(tmp_path / "oov", {"train": [[np.array([5, 9000, 7])]]}, vocab_size=8064)
    with pytest.raises(UserError, match="token id 9000, outside the vocab of 8064"):
        load(oov)
    with pytest.raises(UserError, match="one weight per dir"):
        TokenWindowLoader(args(data["dir"], weights=[1, 2]), split="train", seq_len=8, micro_batch_size=1)


def test_checksums_verified_when_asked(tmp_path):
    d = make_shards(tmp_path / "s", {"train": unique_docs(1, 4)})
    tar = d / "train" / "shard-000000.tar"
    raw = bytearray(tar.read_bytes())
    raw[-1] ^= 0xFF  # in the tar's final zero padding: sizes and documents still match
    tar.write_bytes(bytes(raw))
    next(iter(TokenWindowLoader(args(d), split="train", seq_len=4, micro_batch_size=1)))
    shards_contract._open.clear()
    with pytest.raises(UserError, match="sha256 .* differs from the manifest"):
        next(iter(TokenWindowLoader(args(d, verify_checksums=True), split="train", seq_len=4, micro_batch_size=1)))


# ---------------------------------------------------------------------------------------------
# A shards dir made by the real pipeline


def test_reads_a_dir_from_domainlm_data_shard(tmp_path):
    """`domainlm tokenizer train` + `domainlm data shard` on a small corpus; the loader accepts
    the tokenizer the trainer passes, and its streams hold exactly the documents stock webdataset
    reads from the shards."""
    import webdataset as wds

    from domainlm.cli import main
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    rng = np.random.default_rng(3)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(600)]
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(120):
            text = " ".join(rng.choice(words, int(rng.integers(20, 80)))) + f". Document {i}."
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "corpus.jsonl"), "--output",
                 str(tmp_path / "tok"), "--vocab-size", "512"]) == 0
    assert main(["data", "shard", "--input", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "shards"), "--valid-fraction", "0.2",
                 "--beam.direct-num-workers", "1"]) == 0
    tok = load_tokenizer_dir(tmp_path / "tok")
    shards = tmp_path / "shards"
    m = json.loads((shards / "manifest.json").read_text())

    def stock(split: str) -> list[tuple[int, ...]]:
        urls = [str(shards / s["name"]) for s in m["splits"][split]["shards"]]
        return [tuple(s["npy"].tolist()) for s in wds.WebDataset(urls, shardshuffle=False).decode()]

    def make(split: str, **kw) -> TokenWindowLoader:
        return TokenWindowLoader(args(shards, shuffle_buffer=16), split=split, vocab_size=tok.vocab_size,
                                 tokenizer_sha256=tok.sha256, **kw)

    seen = []
    for rank in range(2):
        loader = make("train", seq_len=16, micro_batch_size=1, dp_rank=rank, dp_size=2)
        assert loader.eos_id == tok.eos_id
        seen += epoch_docs(loader, 1)[0]
    assert sorted(seen) == sorted(stock("train"))
    valid = make("valid", seq_len=16, micro_batch_size=2, infinite=False)
    stream = stream_of([row for b in valid for row in b], 16)
    in_valid = set(stock("valid"))
    complete = split_docs(stream[: int(np.flatnonzero(stream == EOS)[-1]) + 1])
    assert len(complete) > 10 and all(d in in_valid for d in complete)
