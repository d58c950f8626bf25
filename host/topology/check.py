"""``vtick topology check FILE``: preflight every machine before anything runs.

For each machine the topology uses, one row: how it is reached, whether its agent
started (so: ssh reaches it in batch mode, its Python runs vtick, the namespace exists
or could be created), its Python and vtick versions (a vtick that differs from this one
is refused, as the run would), whether the ports its VMs will listen on are free on its
address, and the offset of its CLOCK_MONOTONIC against this one's, estimated from the
agent's clock with the minimum-round-trip rule (on one kernel, namespaces included,
there is one clock and the offset is 0 within the round trip; across machines vtick's
links track their offset during the run, host/topology/clocktrack.py).

A netns machine needs root; without it the row says so and why (ip netns exec needs
CAP_SYS_ADMIN), and the check fails.  Namespaces the topology creates are created for the
check and removed after it, so the check also proves that they can be.

Exit status: 0 when every machine is ready, 1 when one is not, 2 for a bad file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import trio

from vtick.host.topology import spec as specmod
from vtick.host.topology.agent import vtick_version
from vtick.host.topology.netns import Network, NetworkError, netns_problem
from vtick.host.topology.remote import AgentHandle, RemoteError, SshControl
from vtick.host.topology.spec import Topology, TopologyError

__all__ = ["check_main", "check_topology", "MachineCheck"]

CLOCK_SAMPLES = 8


@dataclass
class MachineCheck:
    name: str
    how: str
    reachable: str = "-"
    python: str = "-"
    vtick: str = "-"
    ports: str = "-"
    clock: str = "-"
    ok: bool = False
    offset_ns: int | None = None
    rtt_ns: int | None = None


def _ports_for(topo: Topology, machine: str) -> dict[str, list[int]]:
    """address -> ports the VMs hosted on ``machine`` (and the migration destinations
    there) will listen on."""
    out: dict[str, list[int]] = {}
    address = topo.machines[machine].address or "127.0.0.1"
    for vm in topo.vms:
        if vm.host == machine and vm.transport != "ipc" and vm.port is not None:
            out.setdefault(address, []).extend(range(vm.port, vm.port + vm.vcpus))
        mig = vm.migration  # issue 13: a destination's links and incoming channel
        if mig is not None and mig.to == machine and mig.transport != "ipc" and mig.port:
            out.setdefault(address, []).extend(range(mig.port, mig.port + vm.vcpus + 1))
    return out


async def _clock(agent: AgentHandle) -> tuple[int, int]:
    """(offset agent - here, round trip) of the minimum-round-trip sample."""
    best: tuple[int, int] | None = None
    for _ in range(CLOCK_SAMPLES):
        sent = time.monotonic_ns()
        reply = await agent.request("time")
        received = time.monotonic_ns()
        rtt = received - sent
        offset = int(reply["t"]) - (sent + received) // 2
        if best is None or rtt < best[1]:
            best = (offset, rtt)
    assert best is not None
    return best


async def check_topology(topo: Topology) -> list[MachineCheck]:
    """One :class:`MachineCheck` per machine the topology uses."""
    rows = {
        name: MachineCheck(name, topo.machines[name].describe()) for name in topo.used_machines()
    }
    problem = netns_problem() if topo.needs_root() else None
    if problem:
        for row in rows.values():
            if topo.machines[row.name].kind == "netns":
                row.reachable = f"needs root: {problem}"
        runnable = [n for n in rows if topo.machines[n].kind != "netns"]
    else:
        runnable = list(rows)
    network = Network(topo)
    control = SshControl()
    agents: list[AgentHandle] = []
    try:
        if not problem:
            try:
                network.create()
            except NetworkError as exc:
                for name in runnable:
                    if topo.machines[name].create:
                        rows[name].reachable = str(exc)
                runnable = [n for n in runnable if not topo.machines[n].create]
        async with trio.open_nursery() as nursery:

            async def one(name: str) -> None:
                row = rows[name]
                agent = AgentHandle(topo.machines[name], control)
                agents.append(agent)
                try:
                    await agent.start(nursery)
                except RemoteError as exc:
                    row.reachable = str(exc).split(": ", 1)[-1]
                    hello = agent.hello
                    if hello:
                        row.python = str(hello.get("python"))
                        row.vtick = f"{hello.get('vtick')} (here {vtick_version()})"
                    return
                hello = agent.hello
                row.reachable = f"yes ({hello.get('host')}, uid {hello.get('uid')})"
                row.python = str(hello.get("python"))
                row.vtick = str(hello.get("vtick"))
                busy: list[str] = []
                wanted = _ports_for(topo, name)
                for address, ports in wanted.items():
                    reply = await agent.request("ports", host=address, ports=ports)
                    if reply.get("error"):
                        busy.append(str(reply["error"]))
                    elif reply["busy"]:
                        busy.append(f"{address}: {', '.join(map(str, reply['busy']))} in use")
                row.ports = (
                    "; ".join(busy)
                    if busy
                    else "free: " + ", ".join(f"{a}:{min(p)}-{max(p)}" for a, p in wanted.items())
                    if wanted
                    else "none needed"
                )
                offset, rtt = await _clock(agent)
                row.offset_ns, row.rtt_ns = offset, rtt
                if abs(offset) <= rtt // 2 + 1:
                    row.clock = f"one clock (±{rtt / 2e3:.0f}us)"
                else:
                    row.clock = f"{offset / 1e9:+.6f}s ±{rtt / 2e3:.0f}us"
                row.ok = not busy

            async with trio.open_nursery() as checks:
                for name in runnable:
                    checks.start_soon(one, name)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for agent in agents:
                await agent.close()
            control.close()
            network.destroy()
    return list(rows.values())


def check_main(path: str) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    try:
        topo = specmod.load(path)
    except TopologyError as exc:
        print(f"vtick topology check: {exc}", file=sys.stderr)
        return 2
    rows = trio.run(check_topology, topo)
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"Preflight of {path}", title_justify="left")
    for title in ("machine", "how", "reachable", "python", "vtick", "ports", "clock offset"):
        table.add_column(title)
    for r in rows:
        style = None if r.ok else "red"
        table.add_row(
            r.name, r.how, Text(r.reachable, style=style or ""), r.python, r.vtick, r.ports, r.clock
        )
    console.print(table)
    for reason in topo.needs_root():
        if netns_problem():
            console.print(f"needs root: {reason}; run vtick as root (sudo) for this topology")
    bad = [r.name for r in rows if not r.ok]
    if bad:
        console.print(Text(f"not ready: {', '.join(bad)}", style="bold red"))
        return 1
    console.print(Text(f"ready: {len(rows)} machine(s)", style="green"))
    return 0
