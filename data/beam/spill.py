"""Bulk bytes between the stages of `domainlm data shard` on the DirectRunner (and on dask's
local:N cluster, whose workers share this disk too): through files on this machine's disk,
with only their names moving through the runner.

The DirectRunner (FnApiRunner) passes every element from one stage to the next through its
driver process (gRPC in and out, in Python), and for a GroupByKey it also decodes and
re-encodes every grouped value there. Measured on 2 workers, that costs ~10 ms of CPU per MB
passed between stages and ~30 ms per MB through a GroupByKey, most of it in the driver while
the workers wait: for the text (Read to Tokenize) and the tokens (Tokenize to Write) of a
200 MB corpus, a fifth of the run. The workers share this machine's disk, so the blocks are
written to files under the output directory and only references `name:offset:length` move;
what is grouped, and how, is unchanged (the references go through Beam's GroupByKey). The
files take about the corpus's normalized text plus its tokens until the run ends (less than
the shards themselves), and go with the run's temporary output directory.

On other runners (dask with a tcp:// scheduler included) the workers may share no disk, and
their shuffle is built for bulk data: there `Spill(None)` passes the bytes themselves as
elements.
"""

from __future__ import annotations

import os


class Spill:
    """put: blobs -> the elements that stand for them; get: element -> blob."""

    def __init__(self, directory: str | None):
        self.directory = directory

    def put(self, name: str, blobs: list[bytes]) -> list[bytes]:
        """Stand-ins for `blobs`, written together to one file `name` (unique to the element
        being processed, so a retried bundle rewrites the same file)."""
        if not self.directory or not blobs:
            return blobs
        path = os.path.join(self.directory, name)
        refs, offset = [], 0
        with open(path + ".part", "wb") as f:
            for blob in blobs:
                f.write(blob)
                refs.append(f"{name}:{offset}:{len(blob)}".encode())
                offset += len(blob)
        os.replace(path + ".part", path)
        return refs

    def get(self, ref: bytes) -> bytes:
        if not self.directory:
            return ref
        name, offset, size = ref.decode().rsplit(":", 2)
        with open(os.path.join(self.directory, name), "rb") as f:
            f.seek(int(offset))
            data = f.read(int(size))
        if len(data) != int(size):
            raise OSError(f"spill file {name} holds {len(data)} bytes at {offset}, not {size}")
        return data
