"""``smp_call_function`` and friends, modelled on ``kernel/smp.c`` (reference section 9).

Sender (``call_function_many``): for each target, take the per-(sender, target) csd (its
lock flag), fill it in and add it to the target's call queue; raise an IPI only for
targets whose queue was empty; then one IPI (CALL_FUNCTION_SINGLE) for a single target,
the ALLBUT shortcut when the targets are every other online CPU (and shortcuts are on),
or a mask send otherwise; run the function locally if asked; with ``wait`` spin until
every target unlocked its csd.  A dead or unresponsive target ends the wait with an
error after ``timeout_ns``, never a hang.  The end of the run is not such an error: once
the host's shutdown arrived (``end_of_run``) the targets stop running csds, so a wait
still open is *cut off* at once, counted apart and recorded neither as a call latency
nor as an error (it would otherwise wait out the whole timeout and poison both).  A call
the vCPU is stopped in the middle of (the shutdown stops it at its next exit:
``guest/vcpu.py`` ``run_op``) is cut off the same way.

Target (``flush_queue``, from the CALL_FUNCTION vectors' handler): drain the queue; a
synchronous csd runs its function, then unlocks; an asynchronous one unlocks first.

vtick's vCPUs are separate processes without shared memory, so the csd and its unlock
travel as host-relayed :class:`~vtick.guest.cpu.MemoryWrite` messages (no exits).  One
consequence is a documented approximation: "the target's queue was empty" is judged from
this sender's own outstanding csds, so a target may get an IPI that finds an empty queue
when another sender got there first (counted on the target as ``empty_queue_ipis``).

Functions are named (the wire carries a name, not code); :data:`FUNCTIONS` holds them.

For the chaos history (``host/chaos/``) each IPI a sender raises gets an id (per vCPU),
named by :attr:`Smp.sending` while its exits are out; a csd keeps its id from queue to
run to wait; ``Smp.listener`` hears each of those events (``vtick.proto.eventlog``).

``cpu_online_mask`` is memory too, one bitmap every CPU reads, which the host holds: a
booted vCPU stores its own bit (one ``cpu-online`` message, no IPI) and the host sends
each vCPU the whole mask (``online-mask``, coalesced: ``vtick.host.onlinemask``), which
:meth:`Smp.on_online_mask` takes as this CPU's view.  Calls only target online CPUs, as
Linux's do.  The ALLBUT shortcut is used only once every CPU is online (Linux enables
shorthands after all present CPUs booted).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vtick.guest.apic import ApicOps
from vtick.guest.cpu import KernelOp, MemoryWrite, SpinWait, preemption_point
from vtick.proto import messages as m
from vtick.proto.abi import Vector
from vtick.proto.catalog import PREEMPT_CSD_WAIT, WORKLOAD_PARAMS
from vtick.proto.cpumask import decode_mask, mask_cpus
from vtick.proto.eventlog import (
    CSD_CUT_OFF,
    CSD_ERROR,
    CSD_OK,
    G_CSD_QUEUE,
    G_CSD_RUN,
    G_CSD_WAIT,
    G_IPI_SEND,
)

__all__ = [
    "Smp",
    "SmpStats",
    "FUNCTIONS",
    "PREEMPT_CSD_WAIT",
    "DEFAULT_CSD_TIMEOUT_NS",
]

#: Linux's CSD_LOCK_TIMEOUT / smp.csd_lock_timeout default (kernel/smp.c): 5 s.  Linux
#: reports the stuck csd then and keeps spinning; vtick ends the wait with an error (a run
#: must end), so a stall shorter than this is latency, never an error.
DEFAULT_CSD_TIMEOUT_NS = WORKLOAD_PARAMS["csd_lock_timeout_ms"].default * 1_000_000


def _noop(cpu: int, info: int) -> None:
    return None


#: functions a csd may name: fn(cpu_running_it, info)
FUNCTIONS: dict[str, Callable[[int, int], None]] = {"noop": _noop}


@dataclass
class SmpStats:
    calls: int = 0
    csds_sent: int = 0
    ipis_sent: int = 0
    shortcut_ipis: int = 0
    csds_run: int = 0
    empty_queue_ipis: int = 0
    timeouts: int = 0
    errors: int = 0
    #: calls whose wait the end of the run cut off (neither latencies nor errors)
    cut_off: int = 0
    reschedules: int = 0
    ipi_latency_ns: list[int] = field(default_factory=list)  # csd queued -> ran (target)
    call_latency_ns: list[int] = field(default_factory=list)  # call -> all done (sender)
    ran_by_sender: Counter[int] = field(default_factory=Counter)


class Smp:
    """Args:
    cpu, ncpus: this vCPU and the online CPUs (0..ncpus-1).
    ops: the APIC ops used to raise IPIs.
    clock: guest ktime.
    shortcuts: use the ALLBUT/ALLINC shorthands (Linux: once all CPUs booted).
    """

    def __init__(
        self,
        cpu: int,
        ncpus: int,
        ops: ApicOps,
        clock: Callable[[], int],
        shortcuts: bool = True,
        timeout_ns: int = DEFAULT_CSD_TIMEOUT_NS,
    ) -> None:
        self.cpu = cpu
        self.ncpus = ncpus
        self.ops = ops
        self.clock = clock
        self.shortcuts = shortcuts
        self.timeout_ns = timeout_ns
        self.stats = SmpStats()
        self._next_id = 1
        self.outstanding: dict[tuple[int, int], int] = {}  # (target, id) -> sent
        self.failed: dict[tuple[int, int], str] = {}
        self.queue: deque[m.Csd] = deque()  # this CPU's call_single_queue
        self.online: set[int] = {cpu}
        #: (queued, target, ran) of csds whose wait completed, for the trace recorder;
        #: None = not recording
        self.call_records: list[tuple[int, int, int, int]] | None = None
        self._ran: dict[tuple[int, int], int] = {}
        #: the host's shutdown arrived: open waits are cut off, not failed
        self.run_over = False
        #: told (returned, latency) of every completed call (the vCPU's timeline)
        self.on_call: Callable[[int, int], None] | None = None
        #: told (G_* kind, a, b, c) of IPI sends and csd queue/run/wait (the chaos
        #: history, vtick.proto.eventlog); None = not recording
        self.listener: Callable[[int, int, int, int], None] | None = None
        #: the id of the IPI whose exits are out (0: none)
        self.sending = 0
        self._next_ipi = 1

    def end_of_run(self) -> None:
        """The run is over: every vCPU stops running csds, so no wait can complete."""
        self.run_over = True

    def announce_online(self) -> KernelOp[None]:
        """``set_cpu_online``: store this CPU's bit in cpu_online_mask, the one page
        every CPU reads (the host holds it: one store, whatever the number of CPUs)."""
        yield MemoryWrite(m.CpuOnline(cpu=self.cpu))

    def on_online_mask(self, mask: bytes) -> None:
        """The host sent cpu_online_mask as it stands: this CPU's view of it.

        Bits are never cleared (vtick models no CPU going offline), and this CPU is
        online to itself whatever the mask says (its own store may still be on its way).

        Raises:
            ValueError: the mask is malformed for this VM (wrong size, a bit for a CPU
                the VM does not have): a protocol error, the message says which.
        """
        self.online = mask_cpus(decode_mask(mask, self.ncpus)) | {self.cpu}

    # ------------------------------------------------------------------ sender

    def call_function_many(
        self, targets: Iterable[int], func: str, info: int, wait: bool, run_local: bool = False
    ) -> KernelOp[list[str]]:
        """``smp_call_function_many_cond`` (no cond).  Returns the errors (empty = ok)."""
        if func not in FUNCTIONS:
            raise ValueError(f"unknown function {func!r}")
        self.stats.calls += 1
        keys: list[tuple[int, int]] = []
        try:
            return (yield from self._call_many(targets, func, info, wait, run_local, keys))
        except GeneratorExit:
            # The vCPU stopped in the middle of the call (the run ended: the VMM kicked
            # it out of the guest, guest/vcpu.py run_op): cut off like a wait the end of
            # the run cuts off, neither a latency nor an error, and every csd queued so
            # far ends its wait as cut off in the history (call-completes).
            self.stats.cut_off += 1
            for key in keys:
                self.outstanding.pop(key, None)
                if self.listener is not None:
                    self.listener(G_CSD_WAIT, key[1], key[0], CSD_CUT_OFF)
            raise

    def _call_many(
        self,
        targets: Iterable[int],
        func: str,
        info: int,
        wait: bool,
        run_local: bool,
        keys: list[tuple[int, int]],
    ) -> KernelOp[list[str]]:
        """:meth:`call_function_many`'s body; ``keys`` collects the csds it queues."""
        started = self.clock()
        mask = sorted({t for t in targets if t in self.online})
        remote = [t for t in mask if t != self.cpu]
        need_ipi: list[int] = []
        for target in remote:
            was_empty = not any(dst == target for dst, _ in self.outstanding)
            key = (target, self._next_id)
            self._next_id += 1
            sent = self.clock()
            self.outstanding[key] = sent
            keys.append(key)
            msg = m.Csd(
                src=self.cpu, dst=target, id=key[1], func=func, info=info, wait=wait, sent=sent
            )
            if self.listener is not None:
                self.listener(G_CSD_QUEUE, key[1], target, int(wait))
            yield MemoryWrite(msg)
            self.stats.csds_sent += 1
            if was_empty:
                need_ipi.append(target)
        if need_ipi:
            yield from self._send_ipis(need_ipi)
        if run_local and self.cpu in mask:
            FUNCTIONS[func](self.cpu, info)
        if not wait:
            return []
        sent_at = {key: self.outstanding.get(key, started) for key in keys}
        errors = yield from self._wait(keys)
        returned = self.clock()
        if errors is None:  # cut off by the end of the run
            for key in keys:
                self._ran.pop(key, None)
            return []
        if not errors:  # a failed call lasts as long as the timeout: not a latency
            self.stats.call_latency_ns.append(returned - started)
        if self.on_call is not None:
            self.on_call(returned, returned - started)
        if self.call_records is not None:
            for key in keys:
                self.call_records.append((sent_at[key], key[0], self._ran.pop(key, 0), returned))
        return errors

    def call_function(self, func: str, info: int, wait: bool) -> KernelOp[list[str]]:
        """``smp_call_function``: every other online CPU."""
        return (yield from self.call_function_many(range(self.ncpus), func, info, wait))

    def call_function_single(
        self, cpu: int, func: str, info: int, wait: bool
    ) -> KernelOp[list[str]]:
        if cpu == self.cpu:
            FUNCTIONS[func](self.cpu, info)
            return []
        return (yield from self.call_function_many([cpu], func, info, wait))

    def send_reschedule(self, cpu: int) -> KernelOp[None]:
        """``smp_send_reschedule``."""
        self._ipi(Vector.RESCHEDULE, [cpu])
        try:
            yield from self.ops.send_IPI(cpu, Vector.RESCHEDULE)
        finally:
            self.sending = 0
        self.stats.ipis_sent += 1

    def _ipi(self, vector: int, cpus: list[int]) -> None:
        """Name the IPI about to be raised (its exits carry the id in the history)."""
        self.sending = self._next_ipi
        self._next_ipi += 1
        if self.listener is not None:
            self.listener(G_IPI_SEND, self.sending, vector, sum(1 << c for c in cpus))

    def _send_ipis(self, cpus: list[int]) -> KernelOp[None]:
        """``arch_send_call_function_ipi_mask`` / ``..._single_ipi``."""
        others = [c for c in range(self.ncpus) if c != self.cpu]
        all_online = len(self.online) == self.ncpus
        try:
            if len(cpus) == 1:
                self._ipi(Vector.CALL_FUNCTION_SINGLE, cpus)
                yield from self.ops.send_IPI(cpus[0], Vector.CALL_FUNCTION_SINGLE)
            elif self.shortcuts and all_online and cpus == others:
                self._ipi(Vector.CALL_FUNCTION, cpus)
                yield from self.ops.send_IPI_allbutself(Vector.CALL_FUNCTION)
                self.stats.shortcut_ipis += 1
            else:
                self._ipi(Vector.CALL_FUNCTION, cpus)
                yield from self.ops.send_IPI_mask(cpus, Vector.CALL_FUNCTION)
        finally:
            self.sending = 0
        self.stats.ipis_sent += len(cpus)

    def _wait(self, keys: list[tuple[int, int]]) -> KernelOp[list[str] | None]:
        """``csd_lock_wait`` on every target: spin, interrupts enabled, bounded.

        Returns the errors, or None when the end of the run cut the wait off.
        """
        deadline = self.clock() + self.timeout_ns
        while any(k in self.outstanding for k in keys):
            if self.run_over:
                break
            yield from preemption_point(PREEMPT_CSD_WAIT)
            if self.clock() >= deadline:
                break
            yield SpinWait(deadline)
        errors: list[str] = []
        cut_off = False
        for key in keys:
            outcome = CSD_OK
            if key in self.outstanding:
                del self.outstanding[key]
                if self.run_over:
                    cut_off = True
                    outcome = CSD_CUT_OFF
                else:
                    self.stats.timeouts += 1
                    errors.append(
                        f"vCPU {key[0]} did not run csd {key[1]} within "
                        f"{self.timeout_ns / 1e6:.0f} ms"
                    )
                    outcome = CSD_ERROR
            elif key in self.failed:
                errors.append(self.failed.pop(key))
                outcome = CSD_ERROR
            if self.listener is not None:
                self.listener(G_CSD_WAIT, key[1], key[0], outcome)
        self.stats.errors += len(errors)
        if cut_off and not errors:
            self.stats.cut_off += 1
            return None
        return errors

    def on_done(self, msg: m.CsdDone) -> None:
        """A target unlocked one of our csds (or the host reports it could not)."""
        key = (msg.src, msg.id)
        if msg.error and self.run_over and key in self.outstanding:
            return  # the target ended with the run (said goodbye): cut off, not failed
        if self.outstanding.pop(key, None) is None:
            return  # late: the wait already timed out
        if self.call_records is not None:
            self._ran[key] = msg.ran
        if msg.error:
            self.failed[key] = f"vCPU {msg.src}: {msg.error}"

    # ------------------------------------------------------------------ target

    def on_csd(self, msg: m.Csd) -> None:
        """A csd was added to this CPU's queue (the host relayed the sender's store)."""
        self.queue.append(msg)

    def flush_queue(self) -> KernelOp[None]:
        """``flush_smp_call_function_queue``: run every queued csd."""
        if not self.queue:
            self.stats.empty_queue_ipis += 1
        while self.queue:
            csd = self.queue.popleft()
            fn = FUNCTIONS.get(csd.func)
            done = m.CsdDone(src=self.cpu, dst=csd.src, id=csd.id, ran=self.clock())
            if fn is None:
                yield MemoryWrite(
                    m.CsdDone(
                        src=self.cpu,
                        dst=csd.src,
                        id=csd.id,
                        ran=0,
                        error=f"unknown function {csd.func!r}",
                    )
                )
                continue
            if not csd.wait:
                yield MemoryWrite(done)  # async: unlock first, then run
            fn(self.cpu, csd.info)
            if self.listener is not None:
                self.listener(G_CSD_RUN, csd.src, csd.id, 0)
            self.stats.csds_run += 1
            self.stats.ipi_latency_ns.append(done.ran - csd.sent)
            self.stats.ran_by_sender[csd.src] += 1
            if csd.wait:
                yield MemoryWrite(done)  # sync: run, then unlock
