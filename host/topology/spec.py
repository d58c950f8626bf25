"""The topology file: machines, VMs and where each process runs (TOML, read strictly).

Theory of operation
-------------------
A topology names **machines** (where processes can run: this machine, a network
namespace on it, or another machine reached with ``ssh``), **VMs** (each one host process
with its own mode, IPI path, workload, vCPU count, exit-cost profile and seed) and the
**placement** of each VM's host and of each of its vCPU processes on a machine.  From
that follows each link's transport: ipc when a vCPU shares its host's machine, tcp (or
tls) when it does not.  docs/topology.md is the user's reference; this module is the one
reader of the format.

The file is parsed with the standard library's ``tomllib`` into frozen dataclasses, and
every mistake is a :class:`TopologyError` with one line naming the file, the place in it
and what would be accepted: an unknown key (a typo must not be ignored silently), a
machine nobody defined, a vCPU placed twice or not at all, two VMs whose ports clash on
one address, an ipc link asked to cross machines.  Nothing is started, created or
contacted here: :func:`load` only reads the file and the files it names (TLS material),
so ``vtick topology check`` and ``vtick run --topology`` refuse a bad file before any
process, namespace or connection exists.

Ports: a tcp/tls VM listens on ``port .. port + vcpus - 1`` (one Pair0 socket per vCPU,
docs/protocol.md section 1.2).  A VM that gives no port gets the first free range from
``DEFAULT_PORT`` on its host's address, after the explicit ones.

Migration (issue 13): a VM with ``migrate_at`` and ``migrate_to`` moves, that many seconds
into its run, to a destination host process on machine ``migrate_to`` (:class:`Migration`).
After the move the vCPUs' host is the destination, so the transport rule applies again
with the destination as the host: ipc only when the source host, the destination and every
vCPU share one machine and the VM is ipc; otherwise the VM's tcp or tls (tcp, or tls with a
[tls] table, for an ipc VM that moves away: its vCPUs take up TLS when they redial).
A tcp/tls destination listens for the vCPUs
on ``migrate_port .. migrate_port + vcpus - 1`` of its machine's address and for the source
host (its ``--incoming`` channel) on ``migrate_port + vcpus``; those ports take part in the
clash check like a VM's, on the destination machine's network stack.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from vtick.proto.catalog import (
    APIC_NAMES,
    IPI_VARIANT_NAMES,
    MODE_NAMES,
    WORKLOAD_NAMES,
    WORKLOAD_PARAMS,
)
from vtick.proto.cliargs import vcpu_ranges

__all__ = [
    "TopologyError",
    "SshTarget",
    "Machine",
    "Veth",
    "GuestClock",
    "Vm",
    "TlsFiles",
    "Migration",
    "Topology",
    "load",
    "loads",
    "DEFAULT_PORT",
]

DEFAULT_PORT = 5600
#: names of machines, VMs and namespaces: they end up in file names and ip(8) arguments
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
#: Linux interface names are at most 15 characters; namespaces have no such limit, but
#: vtick derives veth names from them, so keep them short too
_NETNS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")

T = TypeVar("T")


class TopologyError(ValueError):
    """A mistake in a topology file, told in one line."""


@dataclass(frozen=True)
class SshTarget:
    host: str
    user: str | None = None
    port: int = 22
    #: private key file (``ssh -i``); default: ssh's own configuration and agent
    key: str | None = None
    #: known_hosts file to check the machine's host key against (strictly)
    known_hosts: str | None = None

    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def describe(self) -> str:
        return f"{self.destination()}:{self.port}"


@dataclass(frozen=True)
class Machine:
    name: str
    #: "local" (where vtick runs), "netns" (a network namespace here), "ssh" (another one)
    kind: str
    #: the address the machine's listeners are reached at by the other machines
    address: str | None = None
    #: prefix length of ``address`` on a veth vtick creates (netns with create = true)
    prefix: int | None = None
    netns: str | None = None
    #: vtick creates the namespace (and removes it at the end); it must not exist
    create: bool = False
    ssh: SshTarget | None = None
    #: the Python with vtick installed, on that machine (default: "python3" over ssh,
    #: this interpreter locally)
    python: str | None = None

    def describe(self) -> str:
        if self.kind == "ssh" and self.ssh is not None:
            return f"ssh {self.ssh.describe()}"
        if self.kind == "netns":
            return f"netns {self.netns}" + (" (created)" if self.create else "")
        return "local"


@dataclass(frozen=True)
class Veth:
    """A veth pair joining two created namespaces; each end takes its machine's address."""

    a: str
    b: str


@dataclass(frozen=True)
class GuestClock:
    """A synthetic clock for a VM's vCPUs (``vtick guest --clock-skew/--clock-drift-ppm``)."""

    skew_ns: int = 0
    drift_ppm: float = 0.0


@dataclass(frozen=True)
class Migration:
    """Issue 13: where and when a VM moves (``migrate_at``, ``migrate_to``, ``migrate_port``)."""

    #: seconds into the run (once every vCPU connected), strictly inside the duration
    at_s: float
    #: machine of the destination host process
    to: str
    #: "ipc", "tcp" or "tls": the destination's vCPU links and its incoming channel
    transport: str
    #: tcp/tls: vCPU links on port..port+vcpus-1, the incoming channel on port+vcpus
    port: int | None = None


@dataclass(frozen=True)
class Vm:
    name: str
    #: machine of the host process
    host: str
    vcpus: int
    mode: str = "pv-ktime"
    workload: str = "timers"
    ipi: str | None = None
    apic: str | None = None
    hz: int = 1000
    seed: int = 1
    exit_cost: str | None = None
    params: dict[str, int] = field(default_factory=dict)
    #: "ipc", "tcp" or "tls"
    transport: str = "ipc"
    port: int | None = None
    #: vCPU index -> machine name, every vCPU exactly once
    placement: dict[int, str] = field(default_factory=dict)
    clock: GuestClock = field(default_factory=GuestClock)
    #: issue 13: the move to another host process during the run (None: it stays)
    migration: Migration | None = None

    def machines(self) -> list[str]:
        """The machines this VM uses, its host's first (a migration's destination too)."""
        used = set(self.placement.values())
        if self.migration is not None:
            used.add(self.migration.to)
        others = sorted(used - {self.host})
        return [self.host, *others]

    def vcpus_on(self, machine: str) -> list[int]:
        return sorted(i for i, m in self.placement.items() if m == machine)


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    cert_pem: str
    key_pem: str


@dataclass(frozen=True)
class Topology:
    path: str
    machines: dict[str, Machine]
    vms: list[Vm]
    veths: list[Veth] = field(default_factory=list)
    duration_s: float = 1.8
    #: also run each VM alone, to report how much the VMs slowed each other
    alone: bool = False
    allow_insecure_tcp: bool = False
    tls: TlsFiles | None = None

    def vm(self, name: str) -> Vm:
        return next(v for v in self.vms if v.name == name)

    def used_machines(self) -> list[str]:
        """Machines some VM uses, in definition order."""
        used = {m for vm in self.vms for m in vm.machines()}
        return [name for name in self.machines if name in used]

    def listen_url(self, vm: Vm, run_dir: str = "{run}") -> str:
        """The VM host's base URL (``{run}``: the agent's run directory, for ipc)."""
        if vm.transport == "ipc":
            return f"ipc://{run_dir}/{vm.name}.link"
        address = self.machines[vm.host].address or "127.0.0.1"
        if ":" in address:
            address = f"[{address}]"
        scheme = "tls+tcp" if vm.transport == "tls" else "tcp"
        return f"{scheme}://{address}:{vm.port}"

    def migration_urls(self, vm: Vm, run_dir: str = "{run}") -> tuple[str, str]:
        """The destination host's (``--listen`` base URL, ``--incoming`` URL) of a VM that
        migrates (``{run}``: the destination agent's run directory, for ipc)."""
        mig = vm.migration
        assert mig is not None
        if mig.transport == "ipc":
            return f"ipc://{run_dir}/{vm.name}.dest.link", f"ipc://{run_dir}/{vm.name}.incoming"
        assert mig.port is not None
        address = self.machines[mig.to].address or "127.0.0.1"
        if ":" in address:
            address = f"[{address}]"
        scheme = "tls+tcp" if mig.transport == "tls" else "tcp"
        return (
            f"{scheme}://{address}:{mig.port}",
            f"{scheme}://{address}:{mig.port + vm.vcpus}",
        )

    def needs_root(self) -> list[str]:
        """Why this topology needs root, one reason per netns machine (empty if none)."""
        return [
            f"machine {m.name} runs in network namespace {m.netns} (ip netns "
            + ("add/exec" if m.create else "exec")
            + " needs CAP_SYS_ADMIN)"
            for m in self.machines.values()
            if m.kind == "netns" and m.name in self.used_machines()
        ]


# ---------------------------------------------------------------------- reading


def load(path: str) -> Topology:
    """Read and check a topology file.

    Raises:
        TopologyError: the first mistake, in one line naming the file.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise TopologyError(f"{path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path}: not UTF-8 (byte {exc.start})") from None
    return loads(text, path)


def loads(text: str, path: str = "<topology>") -> Topology:
    """Parse topology TOML ``text`` (``path`` names it in errors and anchors relative
    file names).

    Raises:
        TopologyError: the first mistake, in one line.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: not valid TOML: {exc}") from None
    return _Reader(path).topology(data)


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def fail(self, where: str, what: str) -> TopologyError:
        return TopologyError(f"{self.path}: {where}: {what}")

    # -- typed getters

    def keys(self, table: dict[str, Any], where: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(where, f"unknown key {key!r} (known: {', '.join(allowed)})")

    def get(
        self,
        table: dict[str, Any],
        key: str,
        where: str,
        kind: type[T] | tuple[type, ...],
        default: Any = None,
        what: str = "",
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        # bool is an int in Python; a TOML true is never a number here
        if isinstance(value, bool) and kind is not bool:
            ok = False
        elif kind is float:
            ok = isinstance(value, int | float)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise self.fail(f"{where}.{key}", f"expected {what or _kind_name(kind)}, got {value!r}")
        return float(value) if kind is float else value

    def choice(
        self, table: dict[str, Any], key: str, where: str, names: tuple[str, ...], default: Any
    ) -> Any:
        value = self.get(table, key, where, str, default)
        if value is not None and value not in names:
            raise self.fail(f"{where}.{key}", f"{value!r}: choose from {', '.join(names)}")
        return value

    def int_in(
        self, table: dict[str, Any], key: str, where: str, lo: int, hi: int, default: Any
    ) -> Any:
        value = self.get(table, key, where, int, default)
        if value is not None and not lo <= value <= hi:
            raise self.fail(f"{where}.{key}", f"{value} is out of range {lo}..{hi}")
        return value

    def file(self, value: str, where: str) -> str:
        path = os.path.expanduser(value)
        if not os.path.isabs(path):
            path = os.path.join(self.base, path)
        if not os.path.isfile(path):
            raise self.fail(where, f"{value}: no such file")
        return path

    # -- the file

    def topology(self, data: dict[str, Any]) -> Topology:
        self.keys(
            data,
            "top level",
            ("duration", "alone", "allow_insecure_tcp", "tls", "machines", "veths", "vms"),
        )
        duration = self.get(data, "duration", "top level", float, 1.8, "seconds")
        if not 0.1 <= duration <= 86400:
            raise self.fail("duration", f"{duration:g} s is out of range 0.1..86400")
        machines = self.machines(self.get(data, "machines", "top level", dict, None, "a table"))
        veths = [
            self.veth(v, f"veths[{i}]", machines)
            for i, v in enumerate(self.get(data, "veths", "top level", list, [], "an array"))
        ]
        raw_vms = self.get(data, "vms", "top level", list, None, "an array of [[vms]] tables")
        if not raw_vms:
            raise self.fail("top level", "no VM: add at least one [[vms]] table")
        tls = self.tls(self.get(data, "tls", "top level", dict, None, "a table"))
        vms = [self.vm(v, i, machines, tls is not None, duration) for i, v in enumerate(raw_vms)]
        names = [vm.name for vm in vms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise self.fail("vms", f"VM name {twice[0]!r} used twice")
        vms = self.ports(vms, machines)
        alone_default = len(vms) > 1
        topo = Topology(
            path=self.path,
            machines=machines,
            vms=vms,
            veths=veths,
            duration_s=duration,
            alone=self.get(data, "alone", "top level", bool, alone_default),
            allow_insecure_tcp=self.get(data, "allow_insecure_tcp", "top level", bool, False),
            tls=tls,
        )
        self.check_exposure(topo)
        return topo

    def machines(self, raw: dict[str, Any] | None) -> dict[str, Machine]:
        if raw is None:
            return {"local": Machine("local", "local")}
        if not raw:
            raise self.fail("machines", "empty: define at least one machine")
        out: dict[str, Machine] = {}
        netns_seen: dict[str, str] = {}
        for name, table in raw.items():
            where = f"machines.{name}"
            if not _NAME.match(name):
                raise self.fail(where, "a machine name is 1-32 letters, digits, '_', '.', '-'")
            if not isinstance(table, dict):
                raise self.fail(where, f"expected a table, got {table!r}")
            self.keys(table, where, ("address", "netns", "create", "ssh", "python"))
            address, prefix = self.address(table, where)
            netns = self.get(table, "netns", where, str)
            ssh = self.ssh(table.get("ssh"), f"{where}.ssh") if "ssh" in table else None
            create = self.get(table, "create", where, bool, False)
            python = self.get(table, "python", where, str)
            if netns is not None and ssh is not None:
                raise self.fail(where, "netns and ssh together: a machine is one or the other")
            if netns is not None:
                if not _NETNS.match(netns):
                    raise self.fail(
                        f"{where}.netns", f"{netns!r}: 1-15 letters, digits, '_' or '-'"
                    )
                if netns in netns_seen:
                    raise self.fail(
                        f"{where}.netns", f"{netns} is also machine {netns_seen[netns]}'s"
                    )
                netns_seen[netns] = name
            if create and netns is None:
                raise self.fail(f"{where}.create", "only a netns machine can be created")
            if prefix is not None and not create:
                raise self.fail(
                    f"{where}.address",
                    "a prefix length (/N) is only for a namespace vtick creates",
                )
            if create and address is None:
                raise self.fail(where, 'a created namespace needs address = "IP/PREFIX"')
            if create and prefix is None:
                raise self.fail(f"{where}.address", "give the prefix length too, e.g. /24")
            kind = "ssh" if ssh else "netns" if netns else "local"
            if python is not None and kind != "ssh":
                raise self.fail(f"{where}.python", "only for ssh machines (locally: this one)")
            out[name] = Machine(name, kind, address, prefix, netns, create, ssh, python)
        return out

    def address(self, table: dict[str, Any], where: str) -> tuple[str | None, int | None]:
        text = self.get(table, "address", where, str)
        if text is None:
            return None, None
        ip, sep, plen = text.partition("/")
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise self.fail(f"{where}.address", f"{text!r} is not an IP address") from None
        prefix = None
        if sep:
            if not plen.isdigit() or not 0 < int(plen) <= addr.max_prefixlen:
                raise self.fail(f"{where}.address", f"{text!r}: bad prefix length")
            prefix = int(plen)
        if addr.is_unspecified:
            raise self.fail(f"{where}.address", f"{text}: name one address, not every one")
        return str(addr), prefix

    def ssh(self, raw: Any, where: str) -> SshTarget:
        if isinstance(raw, str):
            user, at, host = raw.rpartition("@")
            if not host:
                raise self.fail(where, f"{raw!r}: expected [USER@]HOST")
            return SshTarget(host=host, user=user if at else None)
        if not isinstance(raw, dict):
            raise self.fail(where, f'expected "[USER@]HOST" or a table, got {raw!r}')
        self.keys(raw, where, ("host", "user", "port", "key", "known_hosts"))
        host = self.get(raw, "host", where, str)
        if not host:
            raise self.fail(where, "host is required")
        key = self.get(raw, "key", where, str)
        known = self.get(raw, "known_hosts", where, str)
        return SshTarget(
            host=host,
            user=self.get(raw, "user", where, str),
            port=self.int_in(raw, "port", where, 1, 65535, 22),
            key=self.file(key, f"{where}.key") if key else None,
            known_hosts=self.file(known, f"{where}.known_hosts") if known else None,
        )

    def veth(self, raw: Any, where: str, machines: dict[str, Machine]) -> Veth:
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a table, got {raw!r}")
        self.keys(raw, where, ("ends",))
        ends = self.get(raw, "ends", where, list, None, "two machine names")
        if not ends or len(ends) != 2 or not all(isinstance(e, str) for e in ends):
            raise self.fail(f"{where}.ends", "expected two machine names")
        for end in ends:
            m = machines.get(end)
            if m is None:
                raise self.fail(f"{where}.ends", f"no machine {end!r} ({_known(machines)})")
            if not m.create:
                raise self.fail(f"{where}.ends", f"machine {end} is not a namespace vtick creates")
        if ends[0] == ends[1]:
            raise self.fail(f"{where}.ends", "a veth joins two different machines")
        return Veth(ends[0], ends[1])

    def tls(self, raw: dict[str, Any] | None) -> TlsFiles | None:
        if raw is None:
            return None
        self.keys(raw, "tls", ("cert", "key"))
        cert = self.get(raw, "cert", "tls", str)
        key = self.get(raw, "key", "tls", str)
        if not cert or not key:
            raise self.fail("tls", "needs cert and key (vtick topology certs DIR makes a pair)")
        cert_path = self.file(cert, "tls.cert")
        key_path = self.file(key, "tls.key")
        pems = []
        for path, marker in ((cert_path, "CERTIFICATE"), (key_path, "PRIVATE KEY")):
            with open(path) as fh:
                pem = fh.read()
            if marker not in pem:
                raise self.fail("tls", f"{path}: no PEM {marker.lower()} in it")
            pems.append(pem)
        return TlsFiles(cert_path, key_path, pems[0], pems[1])

    def vm(
        self, raw: Any, index: int, machines: dict[str, Machine], tls: bool, duration: float
    ) -> Vm:
        where = f"vms[{index}]"
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a table, got {raw!r}")
        label = raw.get("name") if isinstance(raw.get("name"), str) else f"vm{index}"
        self.keys(
            raw,
            f"{where} ({label})",
            (
                "name",
                "host",
                "vcpus",
                "mode",
                "workload",
                "ipi",
                "apic",
                "hz",
                "seed",
                "exit_cost",
                "params",
                "transport",
                "port",
                "place",
                "clock_skew_ns",
                "clock_drift_ppm",
                "migrate_at",
                "migrate_to",
                "migrate_port",
            ),
        )
        name = self.get(raw, "name", where, str, f"vm{index}")
        if not _NAME.match(name):
            raise self.fail(f"{where}.name", f"{name!r}: 1-32 letters, digits, '_', '.', '-'")
        where = f"vms[{index}] ({name})"
        host = self.get(raw, "host", where, str)
        if host is None:
            if len(machines) != 1:
                raise self.fail(
                    where, f"say which machine runs its host: host = ({_known(machines)})"
                )
            host = next(iter(machines))
        if host not in machines:
            raise self.fail(f"{where}.host", f"no machine {host!r} ({_known(machines)})")
        vcpus = self.int_in(raw, "vcpus", where, 1, 1024, 4)
        workload = self.choice(raw, "workload", where, WORKLOAD_NAMES, "timers")
        ipi = self.choice(raw, "ipi", where, IPI_VARIANT_NAMES, None)
        if workload == "ipi" and vcpus < 2:
            raise self.fail(where, "the IPI storm needs at least 2 vCPUs")
        exit_cost = self.get(raw, "exit_cost", where, str)
        if exit_cost is not None:
            from vtick.host.exitcost import load_profile

            if exit_cost.endswith(".toml") and not os.path.isabs(exit_cost):
                exit_cost = os.path.join(self.base, exit_cost)
            try:
                load_profile(exit_cost)
            except ValueError as exc:
                raise self.fail(f"{where}.exit_cost", str(exc)) from None
        params = self.params(self.get(raw, "params", where, dict, {}, "a table"), where, workload)
        placement = self.placement(raw.get("place"), where, vcpus, host, machines)
        crosses = any(m != host for m in placement.values())
        transport = self.choice(raw, "transport", where, ("auto", "ipc", "tcp", "tls"), "auto")
        if transport == "auto":
            transport = ("tls" if tls else "tcp") if crosses else "ipc"
        if transport == "ipc" and crosses:
            away = sorted({m for m in placement.values() if m != host})
            raise self.fail(
                f"{where}.transport",
                f"ipc cannot cross machines (vCPUs on {', '.join(away)}, host on {host}): "
                "use tcp or tls",
            )
        if transport == "tls" and not tls:
            raise self.fail(f"{where}.transport", "tls needs a [tls] table with cert and key")
        if transport != "ipc" and crosses and machines[host].address is None:
            raise self.fail(
                where,
                f"its vCPUs reach machine {host} over {transport}: give machines.{host} an address",
            )
        port = self.int_in(raw, "port", where, 1, 65535, None)
        if port is not None and transport == "ipc":
            raise self.fail(f"{where}.port", "an ipc VM has no ports (transport = tcp or tls)")
        if port is not None and port + vcpus - 1 > 65535:
            raise self.fail(f"{where}.port", f"{port}+{vcpus - 1} is beyond 65535")
        migration = self.migration(raw, where, vcpus, host, placement, transport, machines, tls)
        if migration is not None and not 0 < migration.at_s < duration:
            raise self.fail(
                f"{where}.migrate_at",
                f"{migration.at_s:g} s is not inside the run's duration: give 0 < migrate_at "
                f"< {duration:g}",
            )
        drift = self.get(raw, "clock_drift_ppm", where, float, 0.0, "ppm")
        if not -100_000 <= drift <= 100_000:
            raise self.fail(f"{where}.clock_drift_ppm", f"{drift:g} is beyond +-100000 ppm")
        return Vm(
            name=name,
            host=host,
            vcpus=vcpus,
            mode=self.choice(raw, "mode", where, MODE_NAMES, "pv-ktime"),
            workload=workload,
            ipi=ipi,
            apic=self.choice(raw, "apic", where, APIC_NAMES, None),
            hz=self.int_in(raw, "hz", where, 100, 10_000, 1000),
            seed=self.int_in(raw, "seed", where, 0, 2**63 - 1, 1),
            exit_cost=exit_cost,
            params=params,
            transport=transport,
            port=port,
            placement=placement,
            clock=GuestClock(
                skew_ns=self.int_in(raw, "clock_skew_ns", where, -(10**15), 10**15, 0),
                drift_ppm=drift,
            ),
            migration=migration,
        )

    def migration(
        self,
        raw: dict[str, Any],
        where: str,
        vcpus: int,
        host: str,
        placement: dict[int, str],
        transport: str,
        machines: dict[str, Machine],
        tls: bool,
    ) -> Migration | None:
        """The VM's move (issue 13), or None; the transport rule with the destination as
        the vCPUs' host."""
        at = self.get(raw, "migrate_at", where, float, None, "seconds")
        to = self.get(raw, "migrate_to", where, str, None, "a machine name")
        port = self.int_in(raw, "migrate_port", where, 1, 65535, None)
        if at is None and to is None:
            if port is not None:
                raise self.fail(f"{where}.migrate_port", "only with migrate_at and migrate_to")
            return None
        if at is None or to is None:
            missing = "migrate_to" if to is None else "migrate_at"
            raise self.fail(where, f"migrate_at and migrate_to go together: add {missing}")
        if to not in machines:
            raise self.fail(f"{where}.migrate_to", f"no machine {to!r} ({_known(machines)})")
        one_machine = transport == "ipc" and to == host
        if one_machine:
            dest = "ipc"
        elif transport != "ipc":
            dest = transport
        else:
            dest = "tls" if tls else "tcp"  # (PairEndpoint.redial configures TLS)
        crosses = to != host or any(m != to for m in placement.values())
        if dest != "ipc" and crosses and machines[to].address is None:
            raise self.fail(
                where,
                f"it migrates to machine {to} over {dest}: give machines.{to} an address",
            )
        if port is not None and dest == "ipc":
            raise self.fail(
                f"{where}.migrate_port",
                "an ipc move has no ports (the source, destination and vCPUs share a machine)",
            )
        if port is not None and port + vcpus > 65535:
            raise self.fail(f"{where}.migrate_port", f"{port}+{vcpus} is beyond 65535")
        return Migration(at_s=at, to=to, transport=dest, port=port)

    def params(self, raw: dict[str, Any], where: str, workload: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, value in raw.items():
            spec = WORKLOAD_PARAMS.get(key)
            if spec is None:
                raise self.fail(
                    f"{where}.params",
                    f"unknown parameter {key!r} (known: {', '.join(WORKLOAD_PARAMS)})",
                )
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(f"{where}.params.{key}", f"expected an integer, got {value!r}")
            if not spec.lowest <= value <= spec.highest:
                raise self.fail(
                    f"{where}.params.{key}",
                    f"{value} is out of range {spec.lowest}..{spec.highest}",
                )
            if workload not in spec.workloads:
                raise self.fail(
                    f"{where}.params.{key}",
                    f"only the {' and '.join(spec.workloads)} workload(s) read it, this VM "
                    f"runs {workload}",
                )
            out[key] = value
        return out

    def placement(
        self,
        raw: Any,
        where: str,
        vcpus: int,
        host: str,
        machines: dict[str, Machine],
    ) -> dict[int, str]:
        if raw is None:
            return dict.fromkeys(range(vcpus), host)
        if not isinstance(raw, dict) or not raw:
            raise self.fail(
                f"{where}.place", 'expected a table machine = "vCPUs", e.g. { g1 = "0-3" }'
            )
        out: dict[int, str] = {}
        for machine, spec in raw.items():
            if machine not in machines:
                raise self.fail(f"{where}.place", f"no machine {machine!r} ({_known(machines)})")
            for i in self.vcpu_list(spec, f"{where}.place.{machine}"):
                if i >= vcpus:
                    raise self.fail(
                        f"{where}.place.{machine}", f"vCPU {i} is beyond vcpus = {vcpus}"
                    )
                if i in out:
                    raise self.fail(
                        f"{where}.place",
                        f"vCPU {i} placed twice (on {out[i]} and on {machine})",
                    )
                out[i] = machine
        missing = [i for i in range(vcpus) if i not in out]
        if missing:
            raise self.fail(
                f"{where}.place",
                f"vCPU {vcpu_ranges(missing, ', ')} placed nowhere (vcpus = {vcpus})",
            )
        return out

    def vcpu_list(self, spec: Any, where: str) -> list[int]:
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = str(spec)
        if isinstance(spec, list):
            parts = spec
        elif isinstance(spec, str):
            parts = [p.strip() for p in spec.split(",")]
        else:
            raise self.fail(where, f'expected "N", "A-B" or a list, got {spec!r}')
        out: list[int] = []
        for part in parts:
            if isinstance(part, int) and not isinstance(part, bool):
                out.append(part)
                continue
            first, sep, last = str(part).partition("-")
            if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
                raise self.fail(where, f"{part!r}: expected N or A-B")
            lo, hi = int(first), int(last) if sep else int(first)
            if hi < lo:
                raise self.fail(where, f"{part!r} is not a range")
            for i in range(lo, hi + 1):
                if i in out:
                    raise self.fail(where, f"vCPU {i} placed twice")
                out.append(i)
        return out

    def ports(self, vms: list[Vm], machines: dict[str, Machine]) -> list[Vm]:
        """Give port-less tcp/tls VMs (and migration destinations) free ranges; refuse
        ranges that clash on one network stack."""
        taken: dict[str, list[tuple[int, int, str]]] = {}

        def stack_of(machine: str) -> str:
            # machines that share this machine's network stack share its ports: every
            # local-kind machine is one stack (this machine's)
            m = machines[machine]
            if m.kind == "netns" and m.netns is not None:
                return f"netns {m.netns}"
            return f"ssh {m.name}" if m.kind == "ssh" else "local"

        def clash(stack: str, lo: int, hi: int) -> tuple[int, int, str] | None:
            return next((t for t in taken.get(stack, []) if lo <= t[1] and t[0] <= hi), None)

        def claim(vm: Vm, owner: str, machine: str, lo: int, hi: int) -> None:
            stack = stack_of(machine)
            other = clash(stack, lo, hi)
            if other is not None:
                both = range(max(lo, other[0]), min(hi, other[1]) + 1)
                theirs = other[2] if " " in other[2] else f"VM {other[2]}"
                raise self.fail(
                    f"vms ({vm.name})",
                    f"port {both[0]} clashes with {theirs} on machine {machine}: "
                    f"{owner} uses {lo}..{hi}, {other[2]} {other[0]}..{other[1]}",
                )
            taken.setdefault(stack, []).append((lo, hi, owner))

        def first_free(vm: Vm, machine: str, count: int) -> int:
            stack = stack_of(machine)
            port = DEFAULT_PORT
            while (c := clash(stack, port, port + count - 1)) is not None:
                port = c[1] + 1
            if port + count - 1 > 65535:
                raise self.fail(f"vms ({vm.name})", "no free port range left")
            return port

        def dest_owner(vm: Vm) -> str:
            return f"{vm.name}'s migration destination"

        for vm in vms:  # the explicit ranges first
            if vm.transport != "ipc" and vm.port is not None:
                claim(vm, vm.name, vm.host, vm.port, vm.port + vm.vcpus - 1)
            mig = vm.migration
            if mig is not None and mig.transport != "ipc" and mig.port is not None:
                # the vCPUs' links, then the incoming channel: vcpus + 1 ports
                claim(vm, dest_owner(vm), mig.to, mig.port, mig.port + vm.vcpus)
        out = []
        for vm in vms:
            if vm.transport != "ipc" and vm.port is None:
                port = first_free(vm, vm.host, vm.vcpus)
                claim(vm, vm.name, vm.host, port, port + vm.vcpus - 1)
                vm = replace(vm, port=port)
            mig = vm.migration
            if mig is not None and mig.transport != "ipc" and mig.port is None:
                port = first_free(vm, mig.to, vm.vcpus + 1)
                claim(vm, dest_owner(vm), mig.to, port, port + vm.vcpus)
                vm = replace(vm, migration=replace(mig, port=port))
            out.append(vm)
        return out

    def check_exposure(self, topo: Topology) -> None:
        if topo.allow_insecure_tcp:
            return
        for vm in topo.vms:
            listens = [(vm.transport, vm.host, "")]
            if vm.migration is not None:
                listens.append((vm.migration.transport, vm.migration.to, " (its destination)"))
            for transport, machine, whose in listens:
                if transport != "tcp":
                    continue
                address = topo.machines[machine].address or "127.0.0.1"
                if not ipaddress.ip_address(address).is_loopback:
                    raise self.fail(
                        f"vms ({vm.name})",
                        f"tcp on {address}{whose} carries the token and every exit in clear "
                        'text: use transport = "tls" with a [tls] table, or set '
                        "allow_insecure_tcp = true on a network you trust",
                    )


def _known(machines: dict[str, Machine]) -> str:
    return "machines: " + ", ".join(machines)


def _kind_name(kind: Any) -> str:
    names: dict[Any, str] = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a table",
        list: "an array",
    }
    return names.get(kind, str(kind))
