"""The DirectRunner worker process of `domainlm data shard`: Beam's own SDK worker
(apache_beam.runners.worker.sdk_worker_main) with its start-up chatter filtered.

Beam's worker logs to stderr at INFO until it has read the pipeline options, and warns about
things that do not apply to a local run (a missing staging directory, the GCP client
libraries); with one worker per core that is a screen of noise before every run. Real
warnings and errors still show, and everything still goes to the runner's log service.
"""

from __future__ import annotations

import logging
import os
import sys

NOISE = (
    "apitools not found",
    "google.cloud.bigquery_storage_v1",
    "No semi_persistent_directory found",
    "Logging handler created",
    "--direct_runner_use_stacked_bundle",
    "direct_running_mode should be",
    "Missing pipeline option (runner)",
    "Discarding unparseable args: ['--direct_runner",
    "Discarding unparseable args: ['--pipeline_type_check",
    "Could not find a compatible bson package",  # pymongo hidden at import (HIDDEN_AT_IMPORT)
)


class QuietBeam(logging.Filter):
    """Drops Beam's start-up warnings that say nothing about the user's run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        msg = record.getMessage()
        return not any(n in msg for n in NOISE)


class StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to sys.stderr as it is when a record comes, not as it was
    when the handler was made (as logging's own last-resort handler does): the handler is
    installed once per process, and a caller that swaps sys.stderr for a while (a test's
    capture, contextlib.redirect_stderr) and closes it must not leave it writing to a closed
    file when a library's thread logs later."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install() -> None:
    """A stderr handler on the root logger for other libraries' warnings and errors (their INFO
    chatter, e.g. dask's client connections, stays out), with the filter, before Beam adds its
    own; then Beam imported without pandas."""
    root = logging.getLogger()
    if not any(isinstance(f, QuietBeam) for h in root.handlers for f in h.filters):
        handler = StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        handler.addFilter(QuietBeam())
        root.addHandler(handler)
    import_beam()


# Imported by `import apache_beam` for what this pipeline never uses, each behind Beam's own
# `except ImportError`: pandas (~0.35 s; type hints for DataFrame-valued batches), pymongo
# (~0.06 s; MongoDB IO) and BigQuery IO (~0.11 s with `requests`; its `try` block also holds the
# Pub/Sub and cross-language IO re-exports of `apache_beam.io`). GCS paths are unaffected
# (FileSystems imports its GCS filesystem on its own).
HIDDEN_AT_IMPORT = ("pandas", "pymongo", "apache_beam.io.gcp.bigquery")


def import_beam() -> None:
    """Import apache_beam with HIDDEN_AT_IMPORT hidden, in the driver and in every worker: a
    tenth to a fifth of a small run's fixed cost. Hidden during that import only: a later
    `import pandas` (or of the others) in this process works as usual."""
    if "apache_beam" in sys.modules or any(m in sys.modules for m in HIDDEN_AT_IMPORT):
        return
    for name in HIDDEN_AT_IMPORT:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` -> ImportError
    try:
        import apache_beam  # noqa: F401
    finally:
        for name in HIDDEN_AT_IMPORT:
            del sys.modules[name]
    shorter_sampling_period()


SAMPLING_PERIOD_MS = 20


def shorter_sampling_period() -> None:
    """Beam's per-bundle state sampler (the thread that attributes time to steps, for its
    metrics) backs off from 2 ms to a 200 ms period, and each bundle waits out the current
    period when it ends: ~20 ms per bundle, 0.17 s of a 5 MB run's 2 s. Capped at 20 ms
    (one wake-up per 20 ms while a bundle runs costs nothing measurable)."""
    from apache_beam.runners.worker import statesampler

    init = statesampler.StateSampler.__init__
    if init.__defaults__ and init.__defaults__[-1] > SAMPLING_PERIOD_MS:
        init.__defaults__ = (*init.__defaults__[:-1], SAMPLING_PERIOD_MS)


def dask_setup(worker=None) -> None:
    """Run by a dask worker that preloads this module (`--beam.runner dask`, local:N; on a
    cluster: `dask worker ... --preload domainlm.data.beam.worker`): the same filter."""
    install()


if __name__ == "__main__":
    install()
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)
    # The harness has answered every request and closed its channels; the interpreter's own
    # teardown (freeing every module, joining gRPC's threads) would add ~0.3 s to each run,
    # which the runner waits out before it returns
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
