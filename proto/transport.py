"""The I/O edge shared by host and vCPU processes: one nng Pair0 socket per vCPU link.

Everything above this module is sans-I/O; this is where trio and pynng meet.  One Pair0
socket carries one vCPU's link (never Pub/Sub, Bus or Surveyor, which drop by design).
``recv_max_size`` is set on every socket, and the codec refuses to send more than the
same limit.  Pipe arrivals and departures, which nng reports on its own threads, are
turned into trio-side events so the link layer can resume or fail visibly.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import pynng
import trio

__all__ = [
    "PipeEvent",
    "PairEndpoint",
    "link_url",
    "ipc_path",
    "monotonic_ns",
    "set_clock_skew",
    "trio_deadline",
]

#: how to wait for a message: "fd" (trio waits on nng's receive-notification fd, then a
#: non-blocking recv) or "arecv" (pynng's trio integration).  The environment variable
#: lets the transport benchmark compare both across processes.
RECV_METHOD_ENV = "VTICK_NNG_RECV"
RECV_METHODS = ("fd", "arecv")

#: nng reconnect back-off for dialers (nng #1964: an ipc dialer without a minimum spins)
RECONNECT_MIN_MS = 10
RECONNECT_MAX_MS = 200


_CLOCK_SKEW_NS = 0


def set_clock_skew(ns: int) -> None:
    """Make this process's clock read ``ns`` ahead of CLOCK_MONOTONIC.

    For ``vtick guest --clock-skew``: a vCPU process on one machine can then behave as if
    it ran on another machine whose clock has a different origin, which is what the
    clock-offset estimation at the handshake is for.
    """
    global _CLOCK_SKEW_NS
    _CLOCK_SKEW_NS = ns


def monotonic_ns() -> int:
    """This machine's CLOCK_MONOTONIC in ns (plus any configured skew)."""
    return time.monotonic_ns() + _CLOCK_SKEW_NS


def trio_deadline(host_ns: int) -> float:
    """A trio deadline for CLOCK_MONOTONIC time ``host_ns`` (trio's clock has its own offset)."""
    if host_ns >= (1 << 62):
        return math.inf
    return trio.current_time() + (host_ns - time.monotonic_ns()) / 1e9


def link_url(base: str, vcpu: int) -> str:
    """The address of vCPU ``vcpu``'s link, derived from the run's base URL.

    ``ipc:///dir/vtick`` -> ``ipc:///dir/vtick.3``; ``tcp://127.0.0.1:5600`` ->
    ``tcp://127.0.0.1:5603`` (one port per vCPU, so Pair0 can keep one peer per socket);
    ``abstract://name`` -> ``abstract://name.3``.
    """
    parts = urlsplit(base)
    if parts.scheme in ("ipc", "abstract", "inproc"):
        return f"{base}.{vcpu}"
    if parts.scheme == "tcp":
        if parts.port is None or parts.port == 0:
            raise ValueError(f"{base}: tcp URLs need an explicit port (vCPU i uses port+i)")
        if parts.port + vcpu > 65535:
            raise ValueError(f"{base}: port {parts.port}+{vcpu} is beyond 65535")
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"tcp://{host}:{parts.port + vcpu}"
    raise ValueError(f"{base}: unsupported transport {parts.scheme!r} (use ipc:// or tcp://)")


def ipc_path(url: str) -> str | None:
    """The filesystem path of an ipc:// URL, or None for other transports."""
    if url.startswith("ipc://"):
        return url[len("ipc://") :]
    return None


@dataclass(frozen=True, slots=True)
class PipeEvent:
    added: bool
    pipe_id: int


class PairEndpoint:
    """One Pair0 socket with trio-side pipe events.

    Receiving waits with ``trio.lowlevel.wait_readable`` on nng's receive-notification
    fd (level-triggered: readable while a message is queued) and then takes the message
    with a non-blocking ``recv_msg``, which also names the pipe it came on.  pynng's
    ``arecv`` allocates an nng aio per call and wakes trio from an nng thread; the
    transport benchmark measures both in the same run (``vtick bench transport``) and
    the fd path is faster.  Sending tries the non-blocking path first and only
    awaits when nng's queue is full (Pair0 applies back-pressure, it does not drop).
    A frame nng does not take at once waits in a backlog drained by one sender task, so
    frames leave in the order they were produced and no receive loop waits on a send.
    """

    def __init__(self, sock: pynng.Pair0, max_message: int, recv_method: str | None = None) -> None:
        self.recv_method = recv_method or os.environ.get(RECV_METHOD_ENV, "fd")
        if self.recv_method not in RECV_METHODS:
            raise ValueError(f"{RECV_METHOD_ENV}={self.recv_method!r}: use one of {RECV_METHODS}")
        self.sock = sock
        self.max_message = max_message
        self._token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[PipeEvent](math.inf)
        self._events_send = send
        self.pipe_events = recv
        self.current_pipe: pynng.Pipe | None = None
        self._closed = False
        self._recv_fd: int | None = None
        self._backlog: deque[bytes] = deque()
        self._backlog_ready = trio.Event()
        sock.add_post_pipe_connect_cb(self._on_add)
        sock.add_post_pipe_remove_cb(self._on_remove)

    @classmethod
    def listen(cls, url: str, max_message: int) -> PairEndpoint:
        sock = pynng.Pair0(recv_max_size=max_message)
        ep = cls(sock, max_message)
        try:
            sock.listen(url)
        except pynng.NNGException as exc:
            sock.close()
            raise OSError(f"cannot listen on {url}: {exc}") from None
        return ep

    @classmethod
    def dial(cls, url: str, max_message: int, recv_method: str | None = None) -> PairEndpoint:
        sock = pynng.Pair0(
            recv_max_size=max_message,
            reconnect_time_min=RECONNECT_MIN_MS,
            reconnect_time_max=RECONNECT_MAX_MS,
        )
        ep = cls(sock, max_message, recv_method)
        # block=False: keep retrying in the background until the host is there
        sock.dial(url, block=False)
        return ep

    # nng calls these on its own threads
    def _post(self, event: PipeEvent) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._events_send.send_nowait, event)

    def _on_add(self, pipe: pynng.Pipe) -> None:
        self._post(PipeEvent(True, pipe.id))

    def _on_remove(self, pipe: pynng.Pipe) -> None:
        self._post(PipeEvent(False, pipe.id))

    async def recv(self) -> tuple[bytes, pynng.Pipe]:
        """The next message and the pipe it came on.  Raises pynng.Closed after close()."""
        if self.recv_method == "arecv":
            msg = await self.sock.arecv_msg()
            self.current_pipe = msg.pipe
            return msg.bytes, msg.pipe
        if self._recv_fd is None:
            self._recv_fd = self.sock.recv_fd
        while True:
            if self._closed:
                raise pynng.Closed
            try:
                msg = self.sock.recv_msg(block=False)
            except pynng.TryAgain:
                try:
                    await trio.lowlevel.wait_readable(self._recv_fd)
                except trio.ClosedResourceError:
                    raise pynng.Closed from None
                continue
            # data was already there: still give other tasks their turn
            await trio.lowlevel.cancel_shielded_checkpoint()
            self.current_pipe = msg.pipe
            return msg.bytes, msg.pipe

    def send(self, frames: list[bytes]) -> None:
        """Send ``frames`` in order without ever waiting.

        Each frame goes straight into nng when nng takes it (``block=False``); the first
        one nng refuses, and everything after it, waits in a backlog that
        :meth:`run_sender` drains with blocking sends.  Never waiting here matters: if a
        receive loop could wait on a send, a host and a vCPU both blocked sending to each
        other (Pair0 back-pressure) would deadlock.  The backlog is bounded by the link's
        send window for sequenced frames; the rest are acks.
        """
        for data in frames:
            if len(data) > self.max_message:  # the codec already refuses; belt and braces
                raise ValueError(f"{len(data)}-byte frame exceeds {self.max_message}")
            if self._closed:
                return
            if not self._backlog:
                try:
                    self.sock.send(data, block=False)
                    continue
                except pynng.TryAgain:
                    pass
                except pynng.Closed:
                    return
            self._backlog.append(data)
            self._backlog_ready.set()

    async def run_sender(self) -> None:
        """Drain the backlog into the socket; run this in the endpoint's nursery."""
        while not self._closed:
            await self._backlog_ready.wait()
            while self._backlog:
                try:
                    await self.sock.asend(self._backlog[0])
                except pynng.Closed:
                    return
                self._backlog.popleft()
            self._backlog_ready = trio.Event()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backlog_ready.set()
        if self._recv_fd is not None:
            with contextlib.suppress(Exception):
                trio.lowlevel.notify_closing(self._recv_fd)
        self.sock.close()


def remove_ipc_file(url: str) -> None:
    """Remove an ipc socket file left behind (nng normally unlinks it on close)."""
    path = ipc_path(url)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
