"""The audit log: one JSON line per exchange, written off the request path.

Strategy: a request makes one typed call (``ring.add``) that copies its values into a
preallocated C record of the core's ``AuditRing`` (no tuple, no formatting, no I/O); a
background task formats every pending record into JSON lines in one pass in C and writes
them every ``FLUSH_INTERVAL_S``. Both run for every request on the same CPU, so both are
kept to a few hundred nanoseconds. The ring holds ``MAX_PENDING`` records: past that the
oldest are overwritten and counted as dropped. Successful exchanges may be sampled
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

from fastgw._core.metrics import AuditRing
from fastgw.config.model import AuditConfig

log = logging.getLogger("fastgw.audit")

# 0.2 s: lines reach the file within a fifth of a second, at one write per interval.
FLUSH_INTERVAL_S = 0.2
# Bound on records held between flushes: 50k records is a quarter of a million requests a
# second per worker at FLUSH_INTERVAL_S, well past what one worker serves. A record is
# 144 bytes of C plus the request id it holds (~60), ~10 MB if all are used; the ring's
# pages are touched only as far as it fills. Past it the oldest waiting records are
# dropped and counted.
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
        # The request path calls ``ring.add(...)`` (see AuditRing.add for the fields).
        self.ring = AuditRing(MAX_PENDING)
        self.written = 0
        self._failed = 0  # lines lost to write errors
        self._file: IO[bytes] | None = None
        self._reopen = True
        self._wake = trio.Event()

    @property
    def dropped(self) -> int:
        """Lines lost: overwritten in a full ring, or not written."""
        return self.ring.dropped + self._failed

    def wants_success(self) -> bool:
        """Whether this successful exchange is sampled in."""
        s = self.sample
        return s >= 1.0 or (s > 0.0 and random.random() < s)

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
        n = len(self.ring)
        if not n:
            return 0
        try:
            # Records carry time.perf_counter() readings (cheaper on the request path than
            # reading the wall clock); one offset, taken now, turns them into Unix time.
            data = self.ring.drain_to_bytes(time.time() - time.perf_counter())
            if self._reopen or self._file is None:
                self._open()
            assert self._file is not None
            self._file.write(data)
            self._file.flush()
        except Exception as e:  # the ring is empty either way; serving goes on
            self._failed += n
            log.warning("audit log write failed, %d lines dropped: %s", n, e)
            self._reopen = True
            return 0
        self.written += n
        return n

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
