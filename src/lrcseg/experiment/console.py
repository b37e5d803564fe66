"""One-line progress messages of the experiment runner and the demo: ``[source] message``."""

from __future__ import annotations


def say(source: str, message: str) -> None:
    """Print ``[source] message``, flushed at once (long runs are followed in their logs)."""
    print(f"[{source}] {message}", flush=True)
