"""Logging, progress bars and end-of-run summaries, the same for every stage.

Long work shows a tqdm bar (rate and ETA) on stderr; each command ends with a one-screen
summary on stdout. Bars turn off by themselves when stderr is not a terminal (CI logs, files)
unless DOMAINLM_PROGRESS=1 asks for them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

log = logging.getLogger("domainlm")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("domainlm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def bars_enabled() -> bool:
    env = os.environ.get("DOMAINLM_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "")
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar on stderr showing rate and ETA; silent where bars are off."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=not bars_enabled(), file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}B"


def summary(title: str, rows: list[tuple[str, Any]], file=None) -> str:
    """Print a boxed two-column summary and return its text."""
    width = max([len(k) for k, _ in rows] + [0])
    lines = [f"── {title} " + "─" * max(0, 60 - len(title))]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append("─" * 64)
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text
