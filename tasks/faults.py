"""Test-only fault injection for tasks (kept out of rapidin/): fail once where a flag file says so.

Set RAPIDIN_FAULT_FILE to a path whose content is `<point>` or `<point>:<after>`; the first task that
reaches that point (after `after` units of work) deletes the file and raises. Removing the file is
atomic, so exactly one attempt fails even with several workers.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """A deliberate, one-time failure used to test retries and resume."""


def maybe_fail(point: str, done: int = 0) -> None:
    """Raise InjectedFault once if RAPIDIN_FAULT_FILE names this point and `done` reached its threshold."""
    path = os.environ.get("RAPIDIN_FAULT_FILE")
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            spec = f.read().strip()
    except OSError:
        return
    name, _, after = spec.partition(":")
    if name != point or done < int(after or 0):
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        return  # another attempt claimed it
    raise InjectedFault(f"injected one-time fault at {point} after {done}")
