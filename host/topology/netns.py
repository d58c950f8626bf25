"""Network namespaces that stand in for machines: created for a run, removed after it.

A machine with ``netns = "NAME"`` runs its agent (and so its vtick processes) under ``ip
netns exec NAME``: its own interfaces, addresses and ports, the same kernel and the same
CLOCK_MONOTONIC.  With ``create = true`` vtick makes the namespace for the run (loopback
up) and each ``[[veths]]`` entry joins two such namespaces with a veth pair created
directly inside them (``ip link add ... netns A type veth peer ... netns B``), so nothing
is added to the namespace vtick itself runs in; each end takes its machine's address.
:meth:`Network.destroy` deletes the namespaces it created (which deletes their veths)
and nothing else, whatever happened before.  All of it needs root (CAP_SYS_ADMIN and
CAP_NET_ADMIN) and iproute2; :func:`netns_problem` says in one line what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from vtick.host.topology.spec import Topology

__all__ = ["Network", "NetworkError", "netns_problem", "existing_namespaces"]


class NetworkError(Exception):
    """A namespace or veth could not be created; one line."""


def netns_problem() -> str | None:
    """Why this process cannot use network namespaces, or None."""
    if shutil.which("ip") is None:
        return "iproute2's ip(8) is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns needs CAP_SYS_ADMIN): run as root"
    return None


def existing_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise NetworkError(f"ip {' '.join(args)}: {why}")


class Network:
    """The namespaces and veths of one topology run."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.created: list[str] = []

    def create(self) -> None:
        """Create every ``create = true`` namespace and every veth (nothing if none).

        Raises:
            NetworkError: the first step that failed (what was made is removed again).
        """
        wanted = [m for m in self.topo.machines.values() if m.create]
        if not wanted:
            return
        problem = netns_problem()
        if problem:
            raise NetworkError(problem)
        exists = existing_namespaces()
        for m in wanted:
            assert m.netns is not None
            if m.netns in exists:
                raise NetworkError(
                    f"machine {m.name}: network namespace {m.netns} exists already (left by "
                    f"another run? ip netns del {m.netns}), or set create = false to use it"
                )
        try:
            for m in wanted:
                assert m.netns is not None
                _ip("netns", "add", m.netns)
                self.created.append(m.netns)
                _ip("-n", m.netns, "link", "set", "lo", "up")
            for veth in self.topo.veths:
                a, b = self.topo.machines[veth.a], self.topo.machines[veth.b]
                assert a.netns is not None
                assert b.netns is not None
                name_a, name_b = f"vt-{b.name}"[:15], f"vt-{a.name}"[:15]
                _ip(
                    "link", "add", name_a, "netns", a.netns, "type", "veth",
                    "peer", "name", name_b, "netns", b.netns,
                )  # fmt: skip
                for m, name in ((a, name_a), (b, name_b)):
                    assert m.netns is not None
                    _ip("-n", m.netns, "addr", "add", f"{m.address}/{m.prefix}", "dev", name)
                    _ip("-n", m.netns, "link", "set", name, "up")
        except NetworkError:
            self.destroy()
            raise

    def destroy(self) -> list[str]:
        """Delete the namespaces this run created (their veths go with them); returns
        the ones that could not be deleted."""
        left = []
        for ns in reversed(self.created):
            try:
                _ip("netns", "del", ns)
            except NetworkError:
                left.append(ns)
        self.created = []
        return left
