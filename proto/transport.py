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
import select
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import pynng
import pynng.exceptions
import trio
from pynng import ffi as _ffi
from pynng import lib as _lib

__all__ = [
    "PipeEvent",
    "PairEndpoint",
    "link_url",
    "ipc_path",
    "monotonic_ns",
    "set_clock_skew",
    "set_clock_drift",
    "trio_deadline",
    "tls_config",
    "TLS_CERT_ENV",
    "TLS_KEY_ENV",
    "TLS_CA_ENV",
]

#: nng reconnect back-off for dialers (nng #1964: an ipc dialer without a minimum spins)
RECONNECT_MIN_MS = 10
RECONNECT_MAX_MS = 200

#: Messages nng may queue per socket before they are received (NNG_OPT_RECVBUF; 8192 is
#: the most Pair0 accepts).  This is a workaround for a crash in nng itself, not a
#: tuning knob: see PairEndpoint.__init__.
RECV_BUFFER_MSGS = 8192
#: nng's send queue per socket, in messages (NNG_OPT_SENDBUF; Pair0 takes up to 8192)
SEND_BUFFER_MSGS = 1024


_EAGAIN = _lib.NNG_EAGAIN
_ECLOSED = _lib.NNG_ECLOSED
_NONBLOCK = _lib.NNG_FLAG_NONBLOCK
_RECV_FLAGS = _lib.NNG_FLAG_ALLOC | _lib.NNG_FLAG_NONBLOCK

_CLOCK_SKEW_NS = 0
#: --clock-drift-ppm (issue 12): this process's clock gains _CLOCK_DRIFT_PPB ns per 10^9
#: ns of CLOCK_MONOTONIC since _CLOCK_DRIFT_FROM, as a machine whose oscillator is off
_CLOCK_DRIFT_PPB = 0
_CLOCK_DRIFT_FROM = 0


def set_clock_skew(ns: int) -> None:
    """Make this process's clock read ``ns`` ahead of CLOCK_MONOTONIC.

    For ``vtick guest --clock-skew``: a vCPU process on one machine can then behave as if
    it ran on another machine whose clock has a different origin, which is what the
    clock-offset estimation at the handshake is for.
    """
    global _CLOCK_SKEW_NS
    _CLOCK_SKEW_NS = ns


def set_clock_drift(ppb: int) -> None:
    """Make this process's clock run ``ppb`` parts per 10^9 fast (negative: slow) from now
    on, as another machine's clock drifts against the host's (``vtick guest
    --clock-drift-ppm``: what the host's clock tracking corrects; issue 12)."""
    global _CLOCK_DRIFT_PPB, _CLOCK_DRIFT_FROM
    if ppb <= -1_000_000_000:
        raise ValueError(f"a drift of {ppb} ppb would stop the clock")
    _CLOCK_DRIFT_FROM = time.monotonic_ns()
    _CLOCK_DRIFT_PPB = ppb


def monotonic_ns() -> int:
    """This machine's CLOCK_MONOTONIC in ns (plus any configured skew and drift)."""
    now = time.monotonic_ns()
    if _CLOCK_DRIFT_PPB:
        now += (now - _CLOCK_DRIFT_FROM) * _CLOCK_DRIFT_PPB // 1_000_000_000
    return now + _CLOCK_SKEW_NS


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
    # tls+tcp:// (issue 12) numbers its ports as tcp:// does; nng's TLS transport
    if parts.scheme in ("tcp", "tls+tcp"):
        if parts.port is None or parts.port == 0:
            raise ValueError(
                f"{base}: {parts.scheme} URLs need an explicit port (vCPU i uses port+i)"
            )
        if parts.port + vcpu > 65535:
            raise ValueError(f"{base}: port {parts.port}+{vcpu} is beyond 65535")
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{parts.scheme}://{host}:{parts.port + vcpu}"
    raise ValueError(
        f"{base}: unsupported transport {parts.scheme!r} (use ipc://, tcp:// or tls+tcp://)"
    )


# ---------------------------------------------------------------------- TLS (issue 12)
#: PEM files of a tls+tcp:// link, from the environment (like the token, never on a
#: command line; ``vtick topology certs DIR`` writes a self-signed pair).  The host
#: presents CERT and KEY; a vCPU trusts CA (the same self-signed certificate will do)
#: and checks the host's name against VTICK_TLS_SERVER_NAME (default "vtick", the name
#: ``vtick topology certs`` puts in the certificate).  TLS authenticates the host and
#: encrypts the link; the run's token is still checked on top (docs/topology.md).
TLS_CERT_ENV = "VTICK_TLS_CERT"
TLS_KEY_ENV = "VTICK_TLS_KEY"
TLS_CA_ENV = "VTICK_TLS_CA"
TLS_SERVER_NAME_ENV = "VTICK_TLS_SERVER_NAME"
TLS_SERVER_NAME = "vtick"


def tls_config(server: bool) -> pynng.TLSConfig:
    """The nng TLS configuration of one end of a tls+tcp:// link, from the environment.

    Raises:
        OSError: a variable is unset or its file cannot be read (one line, naming it).
    """

    def pem(env: str) -> str:
        path = os.environ.get(env)
        if not path:
            side = "host" if server else "vCPU"
            raise OSError(f"tls+tcp:// needs ${env} (a PEM file) on the {side} side")
        try:
            with open(path) as fh:
                return fh.read()
        except OSError as exc:
            raise OSError(f"${env}={path}: {exc.strerror}") from None

    if server:
        return pynng.TLSConfig(
            pynng.TLSConfig.MODE_SERVER,
            own_cert_string=pem(TLS_CERT_ENV),
            own_key_string=pem(TLS_KEY_ENV),
        )
    return pynng.TLSConfig(
        pynng.TLSConfig.MODE_CLIENT,
        ca_string=pem(TLS_CA_ENV),
        server_name=os.environ.get(TLS_SERVER_NAME_ENV, TLS_SERVER_NAME),
    )


# ---------------------------------------------------------------------- end of TLS


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
    with a non-blocking ``recv_msg``, which also names the pipe it came on.  (pynng's
    ``arecv`` allocates an nng aio per call and wakes trio from an nng thread: slower
    in ``vtick bench transport``, and a cancelled ``arecv`` may lose its message.)
    :meth:`try_recv` and :meth:`wait_recv` are the two halves of :meth:`recv` for a
    task that receives in a loop of its own (a vCPU waiting for an exit's reply).
    Sending tries the non-blocking path first and only
    awaits when nng's queue is full (Pair0 applies back-pressure, it does not drop).
    A frame nng does not take at once waits in a backlog drained by one sender task, so
    frames leave in the order they were produced and no receive loop waits on a send.
    """

    def __init__(self, sock: pynng.Pair0, max_message: int) -> None:
        self.sock = sock
        self.max_message = max_message
        # Workaround for a use-after-stop race in nng's pair0 (nng 1.11.0, bundled in
        # pynng 0.9.0), which made the host segfault in nng_recvmsg while vCPUs dropped
        # and re-dialed pipes.  With nng's default receive buffer of 0 messages, a
        # message read from a pipe is parked in that pipe ("rd_ready") until someone
        # receives it.  When the pipe closes while such a read is completing,
        # pair0_pipe_stop() can run first (it sets the socket's pipe to NULL), then the
        # late pair0_pipe_recv_cb() sets rd_ready again without checking that its pipe
        # is still the socket's; the next nng_recvmsg/nng_recv_aio (the fd path and
        # arecv alike) then takes the message from pipe NULL -> SIGSEGV.  With a
        # receive buffer, pair0 queues each message on the socket and only falls back to
        # rd_ready when the buffer is full, so the crash needs RECV_BUFFER_MSGS unread
        # messages at the moment a pipe dies (twice the link's send window).  The late
        # message is then simply queued, tagged with the dead pipe's id, and callers
        # already treat frames from a pipe other than the session's as stale.  Cost: up
        # to RECV_BUFFER_MSGS messages (of at most max_message) queued per socket.
        # Remove this once nng's pair0 checks the pipe there.
        sock.recv_buffer_size = RECV_BUFFER_MSGS
        # A send queue in nng too: a peer that reads slowly (hundreds of vCPUs on a few
        # cores) fills Pair0's pipe at once, and every frame after it then went through
        # the backlog and pynng's aio send, the host's main cost in a 128-vCPU run
        # (py-spy, issue 9).  Queued in nng, a non-blocking send still succeeds.
        sock.send_buffer_size = SEND_BUFFER_MSGS
        self._token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[PipeEvent](math.inf)
        self._events_send = send
        self.pipe_events = recv
        self.current_pipe: pynng.Pipe | None = None
        self._closed = False
        self._recv_fd: int | None = None
        # try_recv's out-parameters, allocated once (cffi)
        self._handle = sock.socket
        self._msg_out = _ffi.new("nng_msg **")
        self._data_out = _ffi.new("char **")
        self._size_out = _ffi.new("size_t *")
        #: pynng's table of live pipes and its lock (private, present in 0.8 and 0.9)
        self._pipe_table = all(
            hasattr(sock, name) for name in ("_pipes", "_pipe_notify_lock", "_add_pipe")
        )
        self._backlog: deque[bytes] = deque()
        self._backlog_ready = trio.Event()
        sock.add_post_pipe_connect_cb(self._on_add)
        sock.add_post_pipe_remove_cb(self._on_remove)

    @classmethod
    def listen(cls, url: str, max_message: int) -> PairEndpoint:
        sock = pynng.Pair0(recv_max_size=max_message)
        if url.startswith("tls+tcp://"):
            try:
                sock.tls_config = tls_config(server=True)
            except (OSError, pynng.NNGException) as exc:
                sock.close()
                raise OSError(f"cannot listen on {url}: {exc}") from None
        ep = cls(sock, max_message)
        try:
            sock.listen(url)
        except pynng.NNGException as exc:
            sock.close()
            raise OSError(f"cannot listen on {url}: {exc}") from None
        return ep

    @classmethod
    def dial(cls, url: str, max_message: int) -> PairEndpoint:
        sock = pynng.Pair0(
            recv_max_size=max_message,
            reconnect_time_min=RECONNECT_MIN_MS,
            reconnect_time_max=RECONNECT_MAX_MS,
        )
        if url.startswith("tls+tcp://"):
            try:
                sock.tls_config = tls_config(server=False)
            except (OSError, pynng.NNGException) as exc:
                sock.close()
                raise OSError(f"cannot dial {url}: {exc}") from None
        ep = cls(sock, max_message)
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
        got = self.try_recv()
        if got is not None:
            # data was already there: still give other tasks their turn.  After a wait
            # the task has just been scheduled; another checkpoint would only cost one
            # more scheduler pass (an epoll_wait) per exit on each side.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return got
        while True:
            await self.wait_recv()
            got = self.try_recv()
            if got is not None:
                return got

    def try_recv(self) -> tuple[bytes, pynng.Pipe] | None:
        """The next message and its pipe if one is queued, else None (never waits).
        Raises pynng.Closed after close().

        This is nng's ``nng_recvmsg`` through pynng's cffi binding rather than
        ``Socket.recv_msg``: that one builds a ``Message`` (two locks, a finalizer) and
        copies the body through a buffer object for every frame, a tenth of the host's
        time per exit in a 4-vCPU timer storm (py-spy, issue 9).  The pipe is found as
        pynng finds it (``Socket._try_associate_msg_with_pipe``): in the socket's table
        of live pipes, and under pynng's pipe lock only when it is not there yet.
        """
        if self._closed:
            raise _closed()
        if not self._pipe_table:
            try:  # a pynng without the pipe table: its own (slower) receive
                msg = self.sock.recv_msg(block=False)
            except pynng.TryAgain:
                return None
            self.current_pipe = msg.pipe
            return msg.bytes, msg.pipe
        rv = _lib.nng_recvmsg(self._handle, self._msg_out, _NONBLOCK)
        if rv:
            if rv == _EAGAIN:
                return None
            pynng.exceptions.check_err(rv)
        msg = self._msg_out[0]
        try:
            lib_pipe = _lib.nng_msg_get_pipe(msg)
            data = _ffi.unpack(_ffi.cast("char *", _lib.nng_msg_body(msg)), _lib.nng_msg_len(msg))
        finally:
            _lib.nng_msg_free(msg)
        pipe_id = _lib.nng_pipe_id(lib_pipe)
        pipe = self.sock._pipes.get(pipe_id)
        if pipe is None:
            # a frame read before nng's pipe callback ran, or after its pipe went
            with self.sock._pipe_notify_lock:
                pipe = self.sock._pipes.get(pipe_id)
                if pipe is None:
                    pipe = self.sock._add_pipe(lib_pipe)
        self.current_pipe = pipe
        return data, pipe

    def try_recv_bytes(self) -> bytes | None:
        """:meth:`try_recv` for a caller that does not need the pipe (a vCPU has one
        peer): nng's plain receive."""
        if self._closed:
            raise _closed()
        rv = _lib.nng_recv(self._handle, self._data_out, self._size_out, _RECV_FLAGS)
        if rv:
            if rv == _EAGAIN:
                return None
            pynng.exceptions.check_err(rv)
        size = self._size_out[0]
        data = _ffi.unpack(self._data_out[0], size)
        _lib.nng_free(self._data_out[0], size)
        return data

    async def wait_recv(self) -> None:
        """Wait until a message may be queued (nng's receive fd is readable).  One task
        at a time may wait (trio's rule for a file descriptor).  Raises pynng.Closed
        when the endpoint is closed while waiting."""
        if self._recv_fd is None:
            self._recv_fd = self.sock.recv_fd
        try:
            await trio.lowlevel.wait_readable(self._recv_fd)
        except trio.ClosedResourceError:
            raise _closed() from None

    def pending(self) -> bool:
        """Is a received message waiting to be read?  (No wait: a poll of nng's receive
        fd.)  Used before declaring a silent peer dead: its frames may be queued here."""
        if self._closed:
            return False
        try:
            fd = self.sock.recv_fd
        except pynng.NNGException:
            return False
        return bool(select.select([fd], [], [], 0)[0])

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
                # nng_send through pynng's binding, as Socket.send does minus its
                # argument checks (data is always bytes here)
                rv = _lib.nng_send(self._handle, data, len(data), _NONBLOCK)
                if not rv:
                    continue
                if rv == _ECLOSED:
                    return
                if rv != _EAGAIN:
                    pynng.exceptions.check_err(rv)
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

    def redial(self, url: str) -> None:
        """Move this dialing socket to another listener (issue 13: the VM migrated).

        The dialers are closed (their pipe goes, so the old host sees the vCPU leave)
        and ``url`` is dialled in the background, as :meth:`dial` does; the socket, its
        receive fd and its tasks stay.  Frames still waiting in the backlog were meant
        for the old peer: they are dropped (the link layer retransmits what matters
        after the resume handshake on the new pipe).
        """
        for dialer in list(self.sock.dialers):
            with contextlib.suppress(pynng.NNGException):
                dialer.close()
        self._backlog.clear()
        try:
            if url.startswith("tls+tcp://"):
                # a socket made for ipc or tcp has no TLS configuration yet
                self.sock.tls_config = tls_config(server=False)
            self.sock.dial(url, block=False)
        except (OSError, pynng.NNGException) as exc:
            raise OSError(f"cannot dial {url}: {exc}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backlog_ready.set()
        if self._recv_fd is not None:
            with contextlib.suppress(Exception):
                trio.lowlevel.notify_closing(self._recv_fd)
        self.sock.close()


def _closed() -> pynng.Closed:
    """The exception pynng raises for a closed socket (its constructor takes a message
    and an errno: a bare ``raise pynng.Closed`` is a TypeError)."""
    return pynng.Closed("socket closed", pynng.lib.NNG_ECLOSED)


def remove_ipc_file(url: str) -> None:
    """Remove an ipc socket file left behind (nng normally unlinks it on close)."""
    path = ipc_path(url)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
