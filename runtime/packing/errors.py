"""The one exception type of the packing pipeline.

Guarantee: every problem with user input that the packing code detects (bad lengths,
an impossible `seq_len`, an unreadable length file, a sampler resumed under another
layout, a bin that does not fit its collator) raises `PackingError`, a `ValueError`
whose message is a single line, so the CLI can print it as `error: <message>` without
a traceback. Internal invariants are never reported with this type.
"""

from __future__ import annotations


class PackingError(ValueError):
    """Invalid input to the packing pipeline; the message is one printable line."""

    def __init__(self, message: str) -> None:
        # One line on purpose: the CLI prints `error: {message}` and nothing else.
        super().__init__(" ".join(part.strip() for part in message.splitlines()))
