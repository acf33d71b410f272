"""The DirectRunner worker process of `domainlm data shard`: Beam's own SDK worker
(apache_beam.runners.worker.sdk_worker_main) with its start-up chatter filtered.

Beam's worker logs to stderr at INFO until it has read the pipeline options, and warns about
things that do not apply to a local run (a missing staging directory, the GCP client
libraries); with one worker per core that is a screen of noise before every run. Real
warnings and errors still show, and everything still goes to the runner's log service.
"""

from __future__ import annotations

import logging
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
)


class QuietBeam(logging.Filter):
    """Drops Beam's start-up messages that say nothing about the user's run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING and record.name.split(".")[0] in ("apache_beam", "__main__"):
            return False
        msg = record.getMessage()
        return not any(n in msg for n in NOISE)


def install() -> None:
    """A stderr handler on the root logger with the filter, before Beam adds its own."""
    root = logging.getLogger()
    if not any(isinstance(f, QuietBeam) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        handler.addFilter(QuietBeam())
        root.addHandler(handler)


if __name__ == "__main__":
    install()
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)
