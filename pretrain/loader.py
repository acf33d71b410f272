"""The streaming loader that feeds pretraining: shards dirs in, token windows out.

    loader = TokenWindowLoader(cfg.data, split="train", seq_len=2048, micro_batch_size=8,
                               dp_rank=rank, dp_size=world, vocab_size=tok.vocab_size)
    for tokens in loader:          # LongTensor [8, 2049]: inputs tokens[:, :-1], labels tokens[:, 1:]
        ...
    ckpt["data"] = loader.state_dict()   # per rank; loader.load_state_dict(...) before iterating

What a rank sees. Each shards dir's split is dealt to the data-parallel ranks by shard (or by
piece of a shard when there are fewer shards than ranks), in a new seeded order every epoch, so
the ranks' streams are disjoint and together hold every document once per epoch
(`loader_plan.py` explains the pieces and blocks). A rank's documents are shuffled in blocks
of `shuffle_buffer` documents and concatenated with an eos after each, and that endless token
stream is cut into windows of seq_len + 1 tokens taken every seq_len tokens, as Megatron's
GPTDataset does: window i holds stream[i*L : i*L + L + 1], so a window's last token is the next
window's first and every token after the first is a label exactly once; documents run across
window boundaries and nothing is padded. Loader workers do not split the data further: they
build whole blocks of the rank's stream ahead of time, so the order of tokens is the same for
any number of workers.

Blending. With several dirs, each window comes from one dir, drawn with probability
proportional to its weight by a seeded draw that depends only on (seed, rank, window number);
each dir runs through its own epochs independently.

State. A position, never data: per dir (epoch, block, offset into the block), plus the number
of windows drawn. Restoring rebuilds only the block the position is in, so resuming costs the
same at any point of a run, and the next batches are exactly those an uninterrupted run would
have produced. The state records what the order depends on (split, rank, number of ranks,
seed, shuffle_buffer, the shard lists) and refuses to load where any differs; worker count,
micro batch size, weights and seq_len (the position is in tokens) may change between runs.

Validation (`split="valid"`, infinite=False): one pass in a fixed order (seed 0, whatever the
training seed), the same windows every time it is iterated; the tail shorter than a window and
the last incomplete micro batch are left out, and `len(loader)` says how many batches there are.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from domainlm.errors import UserError
from domainlm.data.shards import open_shards_dir
from domainlm.tokenizer.tokdir import TokenizerId, check_same
from domainlm.pretrain.config import DataArgs
from domainlm.pretrain.loader_plan import SourcePlan, build_in_worker, init_worker

if TYPE_CHECKING:
    import torch

__all__ = ["DataArgs", "TokenWindowLoader"]

STATE_FORMAT = "domainlm.loader/1"
VALID_SEED = 0
"""The validation split's shuffle seed: fixed, so every run evaluates on the same windows."""
_DRAW_CHUNK = 4096
_EMPTY_EPOCHS_LIMIT = 1000


class _Blocks:
    """Blocks of every source's stream, built in this process or by worker processes ahead of use."""

    def __init__(self, plans: list[SourcePlan], workers: int, last_epoch: int | None):
        self.plans = plans
        self.last_epoch = last_epoch
        self.cache: dict[tuple[int, int, int], np.ndarray] = {}
        self.pending: dict[tuple[int, int, int], cf.Future] = {}
        self.depth = workers + 1
        self.pool = None
        if workers:
            # spawn: a forked copy of a training process (CUDA, NCCL threads) is not safe to use.
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=init_worker, initargs=(plans,))

    def next_key(self, s: int, epoch: int, block: int) -> tuple[int, int] | None:
        """The block after (epoch, block) in source s's stream; None past the last epoch."""
        block += 1
        empty = 0
        while block >= self.plans[s].blocks(epoch):
            epoch, block = epoch + 1, 0
            if self.last_epoch is not None and epoch > self.last_epoch:
                return None
            empty += 1
            if empty > _EMPTY_EPOCHS_LIMIT:
                raise UserError(
                    f"shards dir {self.plans[s].root!r}: rank {self.plans[s].dp_rank} got no documents in "
                    f"{_EMPTY_EPOCHS_LIMIT} epochs; the split has too few documents for "
                    f"{self.plans[s].dp_size} data-parallel ranks"
                )
        return epoch, block

    def get(self, s: int, epoch: int, block: int) -> np.ndarray:
        key = (s, epoch, block)
        arr = self.cache.get(key)
        if arr is None:
            for old in [k for k in self.cache if k[0] == s]:  # reads only move forward
                del self.cache[old]
            fut = self.pending.pop(key, None)
            if fut is not None and not fut.cancelled():
                arr = fut.result()
            else:
                arr = self.plans[s].build_block(epoch, block)
            self.cache[key] = arr
            if self.pool is not None:
                self._prefetch(s, epoch, block)
        return arr

    def _prefetch(self, s: int, epoch: int, block: int) -> None:
        want = []
        nxt: tuple[int, int] | None = (epoch, block)
        for _ in range(self.depth):
            nxt = self.next_key(s, *nxt)
            if nxt is None:
                break
            want.append((s, *nxt))
        for k in [k for k in self.pending if k[0] == s and k not in want]:
            self.pending.pop(k).cancel()
        for k in want:
            if k not in self.pending:
                self.pending[k] = self.pool.submit(build_in_worker, *k)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
            self.pending.clear()


class TokenWindowLoader:
    """Windows of seq_len + 1 tokens from shards dirs, for one data-parallel rank (see the module
    docstring for the order, blending, state and validation)."""

    def __init__(self, args: DataArgs, *, split: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, vocab_size: int | None = None,
                 tokenizer_sha256: str | None = None, infinite: bool = True):
        args.validate()
        if split not in ("train", "valid"):
            raise UserError(f"split {split!r}: the shards dirs hold 'train' and 'valid'")
        if seq_len < 1 or micro_batch_size < 1:
            raise UserError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.args = args
        self.split = split
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.infinite = infinite
        self._seed = args.seed if split == "train" else VALID_SEED
        self._sources = [open_shards_dir(p).split(split) for p in args.shards]
        first = self._sources[0]
        for src in self._sources[1:]:
            check_same(TokenizerId(src.tokenizer_sha256, src.vocab_size),
                       TokenizerId(first.tokenizer_sha256, first.vocab_size),
                       what=f"shards dir {src.path!r}", mine_label=f"shards dir {first.path!r}",
                       fix="a blend of different tokenizers cannot train one model; reshard them with the same "
                       "--tokenizer")
        if vocab_size is not None or tokenizer_sha256 is not None:
            model = TokenizerId(tokenizer_sha256 or first.tokenizer_sha256,
                                first.vocab_size if vocab_size is None else vocab_size)
            check_same(model, TokenizerId(first.tokenizer_sha256, first.vocab_size),
                       what="the model", mine_label=f"shards dir {first.path!r}",
                       fix="train with the shards' tokenizer or reshard the data")
        w = np.array(args.weights or [s.tokens for s in self._sources], np.float64)
        self.weights = w / w.sum()
        """Normalized blend weight of each shards dir."""
        self._plans = [
            SourcePlan(source=i, root=s.path, shards=tuple(s.shards), dtype=s.dtype, eos_id=s.eos_id,
                       vocab_size=s.vocab_size, seed=self._seed, block_docs=args.shuffle_buffer,
                       dp_rank=dp_rank, dp_size=dp_size, verify=args.verify_checksums)
            for i, s in enumerate(self._sources)
        ]
        self._draws: tuple[int, np.ndarray] | None = None
        self._generation = 0
        self._blocks: _Blocks | None = None
        self._reset()

    # -- what the manifests say --------------------------------------------------------------

    @property
    def eos_id(self) -> int:
        return self._sources[0].eos_id

    @property
    def vocab_size(self) -> int:
        return self._sources[0].vocab_size

    @property
    def tokenizer_sha256(self) -> str:
        return self._sources[0].tokenizer_sha256

    @property
    def tokens(self) -> int:
        """Tokens (documents only) of this split over all dirs and ranks."""
        return sum(s.tokens for s in self._sources)

    # -- state -------------------------------------------------------------------------------

    def _reset(self) -> None:
        # Per source: [epoch, block, offset in block, tokens of this epoch already passed].
        self._cursors = [[0, 0, 0, 0] for _ in self._sources]
        self._exhausted = [False] * len(self._sources)
        self._windows = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the batches yielded so far (small, JSON-able)."""
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self._seed,
            "shuffle_buffer": self.args.shuffle_buffer,
            "seq_len": self.seq_len,
            "windows": self._windows,
            "sources": [
                {"path": s.path, "split_id": s.split_id, "epoch": c[0], "block": c[1], "offset": c[2],
                 "epoch_tokens": c[3], "exhausted": x}
                for s, c, x in zip(self._sources, self._cursors, self._exhausted)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict`); the next iteration yields exactly what the
        saving run would have yielded next. Refuses a state whose order this loader cannot
        reproduce, saying what differs."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(f"the data loader state in the checkpoint is not a {STATE_FORMAT} state")
        mine = self.state_dict()
        diffs = [f"{k} {state.get(k)!r} (now {mine[k]!r})"
                 for k in ("split", "dp_rank", "dp_size", "seed", "shuffle_buffer") if state.get(k) != mine[k]]
        saved = state.get("sources", [])
        if len(saved) != len(self._sources):
            diffs.append(f"{len(saved)} shards dirs (now {len(self._sources)})")
        else:
            diffs += [f"the contents of shards dir {s.path!r} (was {old.get('path')!r})"
                      for s, old in zip(self._sources, saved) if old.get("split_id") != s.split_id]
        if diffs:
            raise UserError(
                "cannot resume the data stream exactly: the checkpoint's loader state was saved with "
                + "; ".join(diffs) + ". The order of tokens depends on these; resume with the same data "
                "settings and data-parallel size, or start the data afresh"
            )
        self._cursors = [[int(o["epoch"]), int(o["block"]), int(o["offset"]), int(o["epoch_tokens"])] for o in saved]
        self._exhausted = [bool(o["exhausted"]) for o in saved]
        self._windows = int(state["windows"])
        self._generation += 1  # an iterator made before this point must not go on

    # -- iteration ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker processes of the current iteration (it goes on reading in-process)."""
        if self._blocks is not None:
            self._blocks.close()

    def windows(self) -> int:
        """Whole windows in one pass of a finite loader (the tail shorter than a window left out)."""
        if self.infinite:
            raise TypeError("an infinite TokenWindowLoader has no length; pass infinite=False for one pass")
        windows = 0
        for plan in self._plans:
            t = plan.tokens(0)
            windows += (t - 1) // self.seq_len if t > self.seq_len else 0
        return windows

    def __len__(self) -> int:
        """Batches in one pass of a finite loader (the last incomplete micro batch left out)."""
        return self.windows() // self.micro_batch_size

    def _draw(self, window: int) -> float:
        """The seeded uniform draw of window `window` (positional: no state but the window number)."""
        chunk = window // _DRAW_CHUNK
        if self._draws is None or self._draws[0] != chunk:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, 0x5EED_0003, self.dp_rank, chunk]))
            self._draws = (chunk, rng.random(_DRAW_CHUNK))
        return float(self._draws[1][window % _DRAW_CHUNK])

    def _choose(self, window: int, exhausted: list[bool]) -> int | None:
        live = [i for i, x in enumerate(exhausted) if not x]
        if len(live) <= 1:
            return live[0] if live else None
        cum = np.cumsum(self.weights[live])
        return live[min(int(np.searchsorted(cum, self._draw(window) * cum[-1], side="right")), len(live) - 1)]

    def _read(self, blocks: _Blocks, s: int, cur: list[int], out: np.ndarray) -> list[int] | None:
        """Copy len(out) tokens of source s's stream from cursor `cur`; the cursor after them, or
        None where a finite stream ends first."""
        epoch, block, offset, done = cur
        filled, n = 0, len(out)
        while filled < n:
            if block >= blocks.plans[s].blocks(epoch):
                nxt = blocks.next_key(s, epoch, block - 1)  # the first non-empty block from here on
                if nxt is None:
                    return None
                if nxt[0] != epoch:
                    done = 0
                epoch, block, offset = nxt[0], nxt[1], 0
            arr = blocks.get(s, epoch, block)
            take = min(len(arr) - offset, n - filled)
            out[filled:filled + take] = arr[offset:offset + take]
            filled += take
            offset += take
            done += take
            if offset == len(arr):
                block, offset = block + 1, 0
        return [epoch, block, offset, done]

    def __iter__(self) -> Iterator["torch.Tensor"]:
        """LongTensor batches [micro_batch_size, seq_len + 1]. An infinite loader goes on from its
        state (a fresh one from the start); a finite one starts at its beginning every time."""
        import torch

        if not self.infinite:
            self._reset()
        self._generation += 1
        gen = self._generation
        self.close()
        blocks = self._blocks = _Blocks(self._plans, self.args.num_workers, None if self.infinite else 0)
        L, B = self.seq_len, self.micro_batch_size
        try:
            while True:
                cursors = [list(c) for c in self._cursors]
                exhausted = list(self._exhausted)
                window = self._windows
                batch = np.empty((B, L + 1), np.int64)
                for row in batch:
                    while True:
                        s = self._choose(window, exhausted)
                        if s is None:
                            return
                        after = self._read(blocks, s, cursors[s], row[:L])
                        if after is not None and self._read(blocks, s, after, row[L:]) is not None:
                            cursors[s] = after
                            break
                        exhausted[s] = True
                    window += 1
                if gen != self._generation:
                    raise RuntimeError("the loader's state was loaded or a new iteration started; "
                                       "iterate the loader again to go on from its current state")
                self._cursors, self._exhausted, self._windows = cursors, exhausted, window
                yield torch.from_numpy(batch)
        finally:
            blocks.close()
