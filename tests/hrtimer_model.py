"""Test helper: the reference model the host hrtimer queue is compared with."""

from __future__ import annotations


class Model:
    """The obvious O(n) timer set: handle -> (expiry, arming order)."""

    def __init__(self) -> None:
        self.armed: dict = {}
        self.order = 0

    def arm(self, handle, expiry: int) -> None:
        self.order += 1
        self.armed[handle] = (expiry, self.order)

    def cancel(self, handle) -> bool:
        return self.armed.pop(handle, None) is not None

    def next_expiry(self):
        return min((e for e, _ in self.armed.values()), default=None)

    def expire(self, now: int) -> list:
        due = sorted((entry, h) for h, entry in self.armed.items() if entry[0] <= now)
        for _, h in due:
            del self.armed[h]
        return [h for _, h in due]
