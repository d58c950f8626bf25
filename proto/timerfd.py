"""Nanosecond waits at the I/O edge: a CLOCK_MONOTONIC timerfd watched by trio.

trio's epoll backend rounds every timeout up to whole milliseconds (epoll_wait takes a
millisecond timeout), so a host hrtimer due in 150 us waited for with ``trio.sleep_until``
fires up to a millisecond late, and every lateness figure would sit on that grid.  A
timerfd armed with an absolute CLOCK_MONOTONIC expiry (``timerfd_settime`` with
``TFD_TIMER_ABSTIME``) becomes readable at the expiry with the kernel's hrtimer
resolution, and trio waits for readability with ``wait_readable`` (timerfd_create(2)).

:class:`Alarm` is one reusable timerfd: ``arm(ns)`` sets an absolute expiry (a past one
fires at once, which is how :meth:`Alarm.fire_now` wakes a waiter), ``wait()`` sleeps
until it fires.  Python 3.13 has ``os.timerfd_create``; on 3.11 and 3.12 the same three
libc calls are reached with ctypes.  Where there is no timerfd (not Linux) the fallback
is trio's own clock, reported as ``BACKEND == "trio"`` so results can say which one ran.
"""

from __future__ import annotations

import ctypes
import math
import os
import time

import trio

__all__ = ["BACKEND", "Alarm", "sleep_ns", "sleep_until_ns"]

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000
_TFD_NONBLOCK = 0o4000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_libc() -> ctypes.CDLL | None:
    if not hasattr(os, "eventfd"):  # eventfd and timerfd arrived together: Linux only
        return None
    try:
        # the libc this process already has (CDLL(None)): ctypes.util.find_library would
        # spawn ldconfig in every host and vCPU process at start (64 of them at once in
        # a 64-vCPU run), and a test counting a launcher's children once saw it
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        ]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = None if hasattr(os, "timerfd_create") else _load_libc()
#: which clock the waits use: "timerfd" (ns resolution) or "trio" (ms grid fallback)
BACKEND = "timerfd" if hasattr(os, "timerfd_create") or _LIBC is not None else "trio"


def _create() -> int:
    if hasattr(os, "timerfd_create"):  # Python 3.13+
        return int(os.timerfd_create(_CLOCK_MONOTONIC, flags=_TFD_NONBLOCK | _TFD_CLOEXEC))  # type: ignore[attr-defined,unused-ignore]
    assert _LIBC is not None
    fd = int(_LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"timerfd_create: {os.strerror(err)}")
    return fd


def _settime_abs(fd: int, expiry_ns: int) -> None:
    """Arm ``fd`` for CLOCK_MONOTONIC ``expiry_ns`` (0 disarms; a past time fires now)."""
    if hasattr(os, "timerfd_settime_ns"):  # Python 3.13+
        os.timerfd_settime_ns(fd, flags=_TFD_TIMER_ABSTIME, initial=expiry_ns)  # type: ignore[attr-defined,unused-ignore]
        return
    assert _LIBC is not None
    spec = _Itimerspec()
    spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(expiry_ns, 1_000_000_000)
    if _LIBC.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"timerfd_settime: {os.strerror(err)}")


class Alarm:
    """One reusable absolute CLOCK_MONOTONIC alarm that trio can wait for.

    Only one task waits on an alarm at a time.  Expiries are ``time.monotonic_ns()``
    values (the host's clock; a skewed guest clock converts before arming).
    """

    def __init__(self) -> None:
        self._fd = _create() if BACKEND == "timerfd" else -1
        self._expiry = 0  # for the fallback
        self._event = trio.Event()

    def arm(self, expiry_ns: int) -> None:
        """Fire at ``expiry_ns`` (a time at or before now fires at once)."""
        expiry_ns = max(1, expiry_ns)  # 0 would disarm the timerfd
        self._expiry = expiry_ns
        if self._fd >= 0:
            _settime_abs(self._fd, expiry_ns)
        else:
            self._event.set()  # the fallback waiter re-reads its deadline

    def fire_now(self) -> None:
        """Wake the waiter at once (an earlier deadline appeared, or a kick)."""
        self.arm(1)

    def disarm(self) -> None:
        self._expiry = 0
        if self._fd >= 0:
            _settime_abs(self._fd, 0)

    async def wait(self) -> None:
        """Sleep until the armed expiry passes (for ever while disarmed).

        Always a checkpoint, as every trio wait is, also when the expiry has passed
        already: a loop that is behind its timers (256 periodic LAPIC timers at 1 kHz on
        2 cores: every pass finds the next period due) would otherwise go from pass to
        pass without ever letting another task run; the host's receive loops and its run
        clock starved, and a 2 s run's host was still running 124 s later (issue 9).
        """
        if self._fd >= 0:
            waited = False
            while True:
                try:
                    os.read(self._fd, 8)  # the expiration count; consuming it re-arms
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._fd)
                    waited = True
            if not waited:
                await trio.lowlevel.checkpoint()
            return
        while True:
            self._event = trio.Event()
            if self._expiry and time.monotonic_ns() >= self._expiry:
                self._expiry = 0
                await trio.lowlevel.checkpoint()
                return
            deadline = (
                trio.current_time() + (self._expiry - time.monotonic_ns()) / 1e9
                if self._expiry
                else math.inf
            )
            with trio.move_on_at(deadline):
                await self._event.wait()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def __enter__(self) -> Alarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def sleep_until_ns(expiry_ns: int) -> None:
    """Sleep until CLOCK_MONOTONIC ``expiry_ns`` with ns resolution (a fresh timerfd)."""
    if expiry_ns <= time.monotonic_ns():
        await trio.lowlevel.checkpoint()
        return
    with Alarm() as alarm:
        alarm.arm(expiry_ns)
        await alarm.wait()


async def sleep_ns(ns: int) -> None:
    """Sleep ``ns`` nanoseconds with ns resolution."""
    await sleep_until_ns(time.monotonic_ns() + ns)
