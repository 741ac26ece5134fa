"""The audit log: one JSON line per exchange, written off the request path.

Strategy: a request appends one tuple to a list (no formatting, no I/O); a background
task turns the list into JSON lines (in the core, about a microsecond a line: this runs
for every request, on the same CPU) and writes them every ``FLUSH_INTERVAL_S`` (or
sooner when ``MAX_PENDING`` lines wait). Successful exchanges may be sampled
(``sample_success``); denials and errors never are. SIGUSR1 (``reopen``) reopens the file
so log rotation can move it away. If writing fails the lines are counted as dropped and
the gateway keeps serving: an audit sink must not take the data path down with it.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import IO

import trio

from fastgw._core.metrics import format_audit_lines
from fastgw.config.model import AuditConfig

log = logging.getLogger("fastgw.audit")

# 0.2 s: lines reach the file within a fifth of a second, at one write per interval.
FLUSH_INTERVAL_S = 0.2
# Bound on lines held in memory between flushes (~10 MB at a few hundred bytes each);
# past it the oldest waiting lines are dropped and counted.
MAX_PENDING = 50_000

FIELDS = (
    "time",
    "request_id",
    "client",
    "route",
    "backend",
    "endpoint",
    "status",
    "decision",
    "reason",
    "subject",
    "issuer",
    "key",
    "duration_s",
    "upstream_first_byte_s",
    "bytes_in",
    "bytes_out",
    "retries",
    "trace_id",
)


class AuditLog:
    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self.sample = config.sample_success
        self.pending: list[tuple] = []
        self.written = 0
        self.dropped = 0
        self._file: IO[bytes] | None = None
        self._reopen = True
        self._wake = trio.Event()
        # JSON fragments of the names and codes that recur in every line.
        self._js_cache: dict[object, bytes] = {}

    def wants_success(self) -> bool:
        """Whether this successful exchange is sampled in."""
        s = self.sample
        return s >= 1.0 or (s > 0.0 and random.random() < s)

    def record(self, rec: tuple) -> None:
        """Queue one line (a tuple in FIELDS order, ``time`` first). The request path
        appends to ``pending`` directly; the bound is enforced when flushing."""
        self.pending.append(rec)

    def reopen(self) -> None:
        self._reopen = True

    def _open(self) -> None:
        if self._file is not None and self._file is not sys.stdout.buffer:
            self._file.close()
        path = self.config.path
        self._file = sys.stdout.buffer if path is None else open(path, "ab")
        self._reopen = False

    def flush(self) -> int:
        """Write what is pending; returns the number of lines written."""
        lines = self.pending
        if not lines:
            return 0
        self.pending = []
        if len(lines) > MAX_PENDING:
            self.dropped += len(lines) - MAX_PENDING
            lines = lines[-MAX_PENDING:]
        try:
            if self._reopen or self._file is None:
                self._open()
            assert self._file is not None
            # Records carry time.perf_counter() readings (cheaper on the request path than
            # reading the wall clock); one offset, taken now, turns them into Unix time.
            offset = time.time() - time.perf_counter()
            self._file.write(format_audit_lines(lines, self._js_cache, offset))
            self._file.flush()
        except (OSError, ValueError) as e:
            self.dropped += len(lines)
            log.warning("audit log write failed, %d lines dropped: %s", len(lines), e)
            self._reopen = True
            return 0
        self.written += len(lines)
        return len(lines)

    async def run(self) -> None:
        """Flush periodically until cancelled; flushes once more on the way out."""
        try:
            while True:
                with trio.move_on_after(FLUSH_INTERVAL_S):
                    await self._wake.wait()
                self._wake = trio.Event()
                self.flush()
        finally:
            self.flush()
            if self._file is not None and self._file is not sys.stdout.buffer:
                self._file.close()
