"""The agent channel: one JSON object per line, over a pipe or an ssh channel.

The controller writes requests ``{"op": ..., "re": N, ...}``; the agent answers each with
``{"re": N, "ok": true, ...}`` or ``{"re": N, "ok": false, "error": "one line"}`` and also
sends events of its own (``hello`` first, then ``exited`` whenever a process ends).  JSON
lines keep the channel readable in a terminal and need nothing on the far machine but
the Python that runs vtick; this is control traffic, a few lines per process, never on
the measured path (which is nng between host and vCPUs).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio

__all__ = ["AgentError", "Gone", "LineReader", "LineWriter", "MAX_LINE"]

#: a line longer than this is refused (a fetched results file is the longest one)
MAX_LINE = 96 << 20


class AgentError(Exception):
    """A request the agent could not carry out; the message is its one-line reason."""


class Gone(Exception):
    """The other end of the channel went away."""


class LineWriter:
    def __init__(self, stream: trio.abc.SendStream) -> None:
        self.stream = stream
        self.lock = trio.Lock()

    async def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        async with self.lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, BrokenPipeError):
                raise Gone("the channel is closed") from None

    async def aclose(self) -> None:
        await self.stream.aclose()


class LineReader:
    """JSON objects, one per line; iteration ends at end of file."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        #: lines that were not JSON objects (shown to the user by the controller)
        self.junk: list[str] = []

    async def next(self) -> dict[str, Any] | None:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    return obj
                self.junk.append(line.decode(errors="replace")[:500])
                continue
            if len(self.buf) > MAX_LINE:
                raise Gone(f"a line longer than {MAX_LINE} bytes")
            try:
                chunk = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        while (obj := await self.next()) is not None:
            yield obj
