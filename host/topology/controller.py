"""``vtick run --topology FILE``: run a topology's VMs on their machines, report per VM.

Theory of operation
-------------------
The controller is the one process that sees the whole topology; it owns nothing on any
machine itself.  In order:

1. **Read and refuse.**  spec.load reads the file; every mistake is one line with
   status 2 before anything exists.  So are options of the plain ``vtick run`` that a
   topology does not use, a results path that cannot be written, and a namespace
   machine without root.
2. **Network.**  Namespaces with ``create = true`` and their veths are made
   (netns.Network), and removed at the end whatever happened.
3. **Agents.**  One per machine the VMs use, all started at once (remote.AgentHandle):
   an unreachable machine or another vtick version stops the run in one line.
4. **Alone, then together.**  With ``alone`` (the default when there are several VMs),
   each VM first runs by itself, then all run at the same time: the ratio of the two is
   how much the VMs slowed each other (the noisy-neighbour question).  Each VM's run is
   one host process on its host's machine and one process per vCPU on the machines of
   its placement, started through their agents (a fresh token per VM run, sent inside
   the agent channel), supervised by their ``exited`` events, the host's results file
   fetched from its agent at the end.  A vCPU that fails ends its VM's run with an
   error naming it; the other VMs go on.
5. **Report.**  The results JSON lists the VMs under ``vms`` (each with its metrics,
   full host results, the alone run's metrics, the slow-down, and every link's clock
   tracking); the terminal gets each VM's table, the interference table and, when links
   cross machines, the clock table.

SIGINT or SIGTERM stops the run: the agents stop their processes, the namespaces go,
and what finished is reported (status 130 or 143).  Status 0 when every VM ran without
errors, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio

from vtick.host.migration.results import merge_migration, moved
from vtick.host.topology import spec as specmod
from vtick.host.topology.netns import Network, NetworkError, netns_problem
from vtick.host.topology.remote import AgentHandle, RemoteError, SshControl
from vtick.host.topology.spec import Topology, TopologyError, Vm
from vtick.proto.transport import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV

__all__ = ["topology_main", "run_topology", "VmRun", "TopologyRunFailed"]

#: beyond the duration: the host's connect (30 s) and report (10 s) timeouts, plus slack
HOST_GRACE_S = 60.0
#: the vCPUs still running once their host exited are given this long to follow
VCPU_FOLLOW_S = 10.0
#: a migration's destination waits this long beyond ``migrate_at`` for the VM: the
#: source's READY (15 s) and its vCPUs' connect timeout (30 s), plus slack
DEST_WAIT_S = 60.0


class TopologyRunFailed(Exception):
    """Something outside any one VM failed (a machine, the network); one line."""


class VmRun:
    """One VM's processes in one phase ("alone" or "together")."""

    def __init__(self, topo: Topology, vm: Vm, phase: str, agents: dict[str, AgentHandle]):
        self.topo = topo
        self.vm = vm
        self.phase = phase
        self.agents = agents
        self.tag = f"{vm.name}.{phase}"
        self.results_name = f"{self.tag}.results.json"
        self.dest_results_name = f"{self.tag}.dest.results.json"
        #: (machine, process id) of every process started
        self.started: list[tuple[str, str]] = []

    def host_argv(self, python: str, url: str, exit_cost: str | None) -> list[str]:
        vm = self.vm
        argv = [
            python, "-m", "vtick.host", "host",
            "--listen", url,
            "--vcpus", str(vm.vcpus),
            "--duration", repr(self.topo.duration_s),
            "--results", f"{{run}}/{self.results_name}",
            "--seed", str(vm.seed),
            "--workload", vm.workload,
            "--mode", vm.mode,
            "--hz", str(vm.hz),
        ]  # fmt: skip
        if vm.apic:
            argv += ["--apic", vm.apic]
        if vm.ipi:
            argv += ["--ipi", vm.ipi]
        if exit_cost:
            argv += ["--exit-cost", exit_cost]
        for name, value in sorted(vm.params.items()):
            argv += ["--param", f"{name}={value}"]
        if self.topo.allow_insecure_tcp:
            argv.append("--allow-insecure-tcp")
        return argv

    def guest_argv(self, python: str, url: str, vcpu: int) -> list[str]:
        argv = [python, "-m", "vtick.guest", "--connect", url, "--vcpu", str(vcpu)]
        if self.vm.clock.skew_ns:
            argv += ["--clock-skew", str(self.vm.clock.skew_ns)]
        if self.vm.clock.drift_ppm:
            argv += ["--clock-drift-ppm", repr(self.vm.clock.drift_ppm)]
        return argv

    def dest_argv(
        self, python: str, listen: str, incoming: str, exit_cost: str | None
    ) -> list[str]:
        """Issue 13: the destination host: it waits on ``incoming`` for the VM (its
        configuration comes with the state) and then serves the vCPUs on ``listen``."""
        mig = self.vm.migration
        assert mig is not None
        argv = [
            python, "-m", "vtick.host", "host",
            "--incoming", incoming,
            "--listen", listen,
            # the source starts after our READY, then waits up to 30 s for its vCPUs
            "--connect-timeout", repr(mig.at_s + DEST_WAIT_S),
            "--results", f"{{run}}/{self.dest_results_name}",
        ]  # fmt: skip
        if exit_cost:  # not part of the VM's state: each host models its own exits
            argv += ["--exit-cost", exit_cost]
        if self.topo.allow_insecure_tcp:
            argv.append("--allow-insecure-tcp")
        return argv

    async def _put_exit_cost(self, agent: AgentHandle) -> str | None:
        """The VM's exit-cost profile as ``--exit-cost`` takes it on ``agent``'s machine
        (a profile file here is copied there)."""
        exit_cost = self.vm.exit_cost
        if exit_cost and (text := _file_text(exit_cost)) is not None:
            reply = await agent.request("put", name=f"{self.tag}.exitcost.toml", text=text)
            return str(reply["path"])
        return exit_cost

    async def run(self) -> dict[str, Any]:
        """Start, supervise and collect; returns the host's results (after a migration,
        the destination's with the source's record under ``migration.source``).

        Raises:
            RemoteError: this VM's run failed (the message says which process and why).
        """
        vm, topo = self.vm, self.topo
        host_agent = self.agents[vm.host]
        token = secrets.token_bytes(32).hex()
        url = topo.listen_url(vm)
        host_env = {"VTICK_TOKEN": token}
        guest_env = {"VTICK_TOKEN": token}
        tls = vm.transport == "tls" or (
            vm.migration is not None and vm.migration.transport == "tls"
        )
        if tls:
            host_env[TLS_CERT_ENV] = "{run}/vtick-cert.pem"
            host_env[TLS_KEY_ENV] = "{run}/vtick-key.pem"
            # a source host dials its destination's tls+tcp:// incoming channel
            host_env[TLS_CA_ENV] = "{run}/vtick-cert.pem"
            guest_env[TLS_CA_ENV] = "{run}/vtick-cert.pem"
        host_id = f"{self.tag}.host"
        failure: list[str] = []
        migration_args: list[str] = []
        dest: tuple[AgentHandle, str] | None = None
        try:
            if vm.migration is not None:
                # issue 13: the destination waits first, so the source can reach it
                dest_agent = self.agents[vm.migration.to]
                listen, incoming = topo.migration_urls(vm)
                dest_id = f"{self.tag}.dest"
                dest = (dest_agent, dest_id)
                self.started.append((vm.migration.to, dest_id))
                reply = await dest_agent.request(
                    "start",
                    id=dest_id,
                    argv=self.dest_argv(
                        dest_agent.python, listen, incoming, await self._put_exit_cost(dest_agent)
                    ),
                    env=host_env,
                    ready=True,
                )
                # "READY URL": ipc's {run} is filled in there, and is the same agent's
                incoming = str(reply["ready"]).split(" ", 1)[-1]
                migration_args = ["--migrate-at", repr(vm.migration.at_s), "--migrate-to", incoming]
            self.started.append((vm.host, host_id))
            await host_agent.request(
                "start",
                id=host_id,
                argv=self.host_argv(host_agent.python, url, await self._put_exit_cost(host_agent))
                + migration_args,
                env=host_env,
                ready=True,
            )
            await self._supervise(host_agent, host_id, url, guest_env, failure, dest)
        finally:
            await self.stop()
        try:
            reply = await host_agent.request("fetch", path=f"{{run}}/{self.results_name}")
            results: dict[str, Any] = json.loads(reply["text"])
        except (RemoteError, ValueError) as exc:
            status = host_agent.exits.get(host_id)
            why = failure[0] if failure else f"host wrote no results ({exc})"
            raise RemoteError(f"VM {vm.name}: {why} (host status {status})") from None
        if dest is not None and moved(results):
            try:
                reply = await dest[0].request("fetch", path=f"{{run}}/{self.dest_results_name}")
                results = merge_migration(results, json.loads(reply["text"]))
            except (RemoteError, ValueError) as exc:
                status = dest[0].exits.get(dest[1])
                why = failure[0] if failure else f"destination host wrote no results ({exc})"
                raise RemoteError(f"VM {vm.name}: {why} (destination status {status})") from None
        if failure:
            raise RemoteError(f"VM {vm.name}: {failure[0]}")
        return results

    async def _supervise(
        self,
        host_agent: AgentHandle,
        host_id: str,
        url: str,
        guest_env: dict[str, str],
        failure: list[str],
        dest: tuple[AgentHandle, str] | None = None,
    ) -> None:
        """Start the vCPUs and wait for the host to finish (or a vCPU to fail); with a
        migration, then for the destination (or stop it when the VM never moved)."""
        vm, topo = self.vm, self.topo
        async with trio.open_nursery() as nursery:
            for machine in vm.machines():
                agent = self.agents[machine]
                for i in vm.vcpus_on(machine):
                    pid = f"{self.tag}.vcpu{i}"
                    self.started.append((machine, pid))
                    await agent.request(
                        "start", id=pid, argv=self.guest_argv(agent.python, url, i), env=guest_env
                    )
                    nursery.start_soon(self._watch, agent, pid, f"vCPU {i}", failure, nursery)
            with trio.move_on_after(topo.duration_s + HOST_GRACE_S):
                status = await host_agent.wait_exit(host_id)
                if status is None and not failure:
                    failure.append(f"{host_agent.where()}: the agent went away")
                if dest is not None and status is not None:
                    problem = await self._wait_destination(host_agent, dest)
                    if problem and not failure:
                        failure.append(problem)
            if host_id not in host_agent.exits and not failure:
                failure.append(
                    f"host stopped answering: still running {HOST_GRACE_S:g} s after the "
                    f"run's {topo.duration_s:g} s"
                )
            if dest is not None and dest[1] not in dest[0].exits and not failure:
                failure.append(
                    f"destination host on machine {dest[0].name} stopped answering: still "
                    f"running {HOST_GRACE_S:g} s after the run's {topo.duration_s:g} s"
                )
            if failure:
                nursery.cancel_scope.cancel()
            with trio.move_on_after(VCPU_FOLLOW_S):
                for machine, pid in self.started:
                    await self.agents[machine].wait_exit(pid)
            nursery.cancel_scope.cancel()

    async def _wait_destination(
        self, host_agent: AgentHandle, dest: tuple[AgentHandle, str]
    ) -> str | None:
        """Issue 13, once the source exited: after a move the destination runs the VM to
        the end of the run; when the move failed (the source ran the VM itself) it has
        nothing to run and is stopped.  Returns what went wrong."""
        agent, dest_id = dest
        try:
            reply = await host_agent.request("fetch", path=f"{{run}}/{self.results_name}")
            source = json.loads(reply["text"])
        except (RemoteError, ValueError):
            source = None
        if not moved(source):
            if dest_id not in agent.exits:
                await agent.request("stop", ids=[dest_id])
            return None
        status = await agent.wait_exit(dest_id)
        if status is None:
            return f"{agent.where()}: the agent went away"
        if status != 0:
            return f"destination host on machine {agent.name} {_status(status)}"
        return None

    async def _watch(
        self,
        agent: AgentHandle,
        pid: str,
        name: str,
        failure: list[str],
        nursery: trio.Nursery,
    ) -> None:
        status = await agent.wait_exit(pid)
        if status != 0 and not failure:
            how = "vanished with its agent" if status is None else _status(status)
            failure.append(f"{name} on machine {agent.name} {how}")
            nursery.cancel_scope.cancel()

    async def stop(self) -> None:
        """Stop whatever of this VM still runs (its agents' stop: SIGCONT, TERM, KILL)."""
        with trio.CancelScope(shield=True):
            by_machine: dict[str, list[str]] = {}
            for machine, pid in self.started:
                if pid not in self.agents[machine].exits:
                    by_machine.setdefault(machine, []).append(pid)
            for machine, ids in by_machine.items():
                try:
                    await self.agents[machine].request("stop", ids=ids)
                except RemoteError:
                    pass  # the agent is gone: its processes went with it


def _file_text(path: str) -> str | None:
    """A file's text, or None when ``path`` names no file (a shipped profile's name)."""
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read()


def _status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


# ---------------------------------------------------------------------- the whole run


async def run_topology(
    topo: Topology, on_progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run ``topo`` (alone runs first when asked, then all VMs together).

    Raises:
        TopologyRunFailed: the network or a machine failed before any VM could run.
    """
    from vtick.host.lab.campaign import RESULTS_VERSION, environment
    from vtick.host.lab.metrics import run_metrics

    note = on_progress or (lambda text: None)
    network = Network(topo)
    control = SshControl()
    agents: dict[str, AgentHandle] = {}
    interrupted: list[str] = []
    entries: dict[str, dict[str, Any]] = {vm.name: _vm_entry(topo, vm) for vm in topo.vms}
    try:
        try:
            network.create()
        except NetworkError as exc:
            raise TopologyRunFailed(str(exc)) from None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope, interrupted)
            note("starting the agents")
            agents = {m: AgentHandle(topo.machines[m], control) for m in topo.used_machines()}
            problems: list[str] = []

            async def start(agent: AgentHandle) -> None:
                try:
                    await agent.start(nursery)
                except RemoteError as exc:
                    problems.append(str(exc))

            async with trio.open_nursery() as starting:
                for agent in agents.values():
                    starting.start_soon(start, agent)
            if problems:
                raise TopologyRunFailed(sorted(problems)[0])
            if topo.tls is not None:
                for agent in agents.values():
                    await agent.request("put", name="vtick-cert.pem", text=topo.tls.cert_pem)
                    await agent.request("put", name="vtick-key.pem", text=topo.tls.key_pem)

            async def one(vm: Vm, phase: str) -> None:
                entry = entries[vm.name]
                key = "alone" if phase == "alone" else "together"
                try:
                    results = await VmRun(topo, vm, phase, agents).run()
                except RemoteError as exc:
                    entry[key] = {"error": str(exc)}
                    return
                metrics = run_metrics(results)
                metrics["exit_rtt_ns"] = exit_rtt_ns(results)
                entry[key] = {"metrics": metrics, "results": results}

            if topo.alone:
                for vm in topo.vms:
                    note(f"VM {vm.name} alone")
                    await one(vm, "alone")
            note("all VMs together" if len(topo.vms) > 1 else f"VM {topo.vms[0].name}")
            async with trio.open_nursery() as together:
                for vm in topo.vms:
                    together.start_soon(one, vm, "together")
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as closing:
                for agent in agents.values():
                    closing.start_soon(agent.close)
            control.close()
            left = network.destroy()
    vms = [_finish(entries[vm.name]) for vm in topo.vms]
    doc: dict[str, Any] = {
        "vtick": RESULTS_VERSION,
        "topology": _describe(topo),
        "environment": environment(),
        "agents": {
            name: {k: a.hello.get(k) for k in ("vtick", "python", "host", "pid", "uid", "run_dir")}
            for name, a in agents.items()
        },
        "vms": vms,
        "ok": all(v.get("ok") for v in vms) and not interrupted,
    }
    if left:
        doc["cleanup"] = {"namespaces_left": left}
    if interrupted:
        doc["interrupted"] = interrupted[0]
    return doc


def _vm_entry(topo: Topology, vm: Vm) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": vm.name,
        "host": vm.host,
        "placement": {m: vm.vcpus_on(m) for m in vm.machines() if vm.vcpus_on(m)},
        "transport": vm.transport,
        "url": topo.listen_url(vm, "<run dir>"),
        "config": {
            "vcpus": vm.vcpus,
            "mode": vm.mode,
            "workload": vm.workload,
            "ipi": vm.ipi,
            "apic": vm.apic,
            "hz": vm.hz,
            "seed": vm.seed,
            "exit_cost": vm.exit_cost,
            "params": vm.params,
            "clock_skew_ns": vm.clock.skew_ns,
            "clock_drift_ppm": vm.clock.drift_ppm,
            "duration_s": topo.duration_s,
        },
    }
    if vm.migration is not None:
        listen, incoming = topo.migration_urls(vm, "<run dir>")
        entry["migration"] = {
            "at_s": vm.migration.at_s,
            "to": vm.migration.to,
            "transport": vm.migration.transport,
            "url": listen,
            "incoming": incoming,
        }
    return entry


def _finish(entry: dict[str, Any]) -> dict[str, Any]:
    """Lift the together run to the top of the entry; add the slow-down and clocks."""
    together = entry.pop("together", None) or {"error": "did not run"}
    alone = entry.pop("alone", None)
    if "error" in together:
        entry["error"] = together["error"]
    else:
        entry["metrics"] = together["metrics"]
        entry["results"] = together["results"]
        entry["clock"] = [
            {"vcpu": v["vcpu"], **v["clock"]}
            for v in together["results"]["vcpus"]
            if v.get("clock") is not None
        ]
    if alone is not None:
        entry["alone"] = {k: v for k, v in alone.items() if k != "results"}
        if "metrics" in alone and "metrics" in entry:
            entry["slowdown"] = slowdown(alone["metrics"], entry["metrics"])
    entry["ok"] = (
        "metrics" in entry
        and bool(entry["metrics"]["ok"])
        and (alone is None or "metrics" in alone)
    )
    return entry


def slowdown(alone: dict[str, Any], together: dict[str, Any]) -> dict[str, float | None]:
    """How much running beside the other VMs slowed this one: each figure as together /
    alone for costs (> 1: slower) and alone / together for events/s (> 1: fewer)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def p99(met: dict[str, Any]) -> float | None:
        lat = met.get("lateness_ns") or met.get("call_latency_ns") or {}
        return lat.get("p99")

    return {
        "events_per_s": ratio(alone.get("events_per_s"), together.get("events_per_s")),
        "lateness_p99": ratio(p99(together), p99(alone)),
        "host_us_per_event": ratio(
            together.get("host_p50_ns_per_event"), alone.get("host_p50_ns_per_event")
        ),
        "exit_rtt": ratio(_exit_rtt(together), _exit_rtt(alone)),
    }


def exit_rtt_ns(results: dict[str, Any]) -> float | None:
    """The mean guest-side round trip of a non-HLT exit over the whole run (ns)."""
    total = count = 0
    for v in results.get("vcpus", []):
        guest = v.get("guest") or {}
        for kind, n in (guest.get("exits") or {}).items():
            if kind in ("hlt", "pause"):
                continue  # a HLT waits for an interrupt by design
            total += (guest.get("exit_rtt_ns_total") or {}).get(kind, 0)
            count += n
    return total / count if count else None


def _exit_rtt(met: dict[str, Any]) -> float | None:
    return met.get("exit_rtt_ns")


def _describe(topo: Topology) -> dict[str, Any]:
    return {
        "path": topo.path,
        "duration_s": topo.duration_s,
        "alone": topo.alone,
        "allow_insecure_tcp": topo.allow_insecure_tcp,
        "tls": topo.tls is not None,
        "machines": {
            m.name: {
                "kind": m.kind,
                "address": m.address,
                "netns": m.netns,
                "created": m.create,
                "ssh": m.ssh.describe() if m.ssh else None,
            }
            for m in topo.machines.values()
        },
        "veths": [[v.a, v.b] for v in topo.veths],
    }


async def _watch_signals(scope: trio.CancelScope, interrupted: list[str]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            interrupted.append(signal.Signals(signum).name)
            scope.cancel()
            return


# ---------------------------------------------------------------------- command line


def topology_main(path: str, json_path: str, wide: bool, ignored: list[str]) -> int:
    """``vtick run --topology FILE``: exit status 0 ok, 1 errors, 2 usage, 128+N signal."""
    from rich.console import Console

    from vtick.host.lab.preflight import UsageError, check_output_file
    from vtick.host.results import write_json
    from vtick.host.topology.report import print_topology

    def refuse(text: str) -> int:
        print(f"vtick run: {text}", file=sys.stderr)
        return 2

    if ignored:
        return refuse(
            f"{', '.join(ignored)}: not used with --topology (the file says what each VM "
            "runs); only --json and --wide go with it"
        )
    try:
        topo = specmod.load(path)
        check_output_file(json_path, "--json")
    except (TopologyError, UsageError) as exc:
        return refuse(str(exc))
    if topo.needs_root() and (problem := netns_problem()):
        return refuse(f"{topo.needs_root()[0]}: {problem}")
    console = Console(width=None if sys.stdout.isatty() else 240, stderr=False)
    status = console.status("starting", spinner="dots")
    status.start()
    failed: list[str] = []
    doc: dict[str, Any] = {}
    try:
        doc = trio.run(run_topology, topo, lambda text: status.update(text))
    except* TopologyRunFailed as group:  # raised inside the run's nursery
        failed.append(str(group.exceptions[0]))
    finally:
        status.stop()
    if failed:
        print(f"vtick run: {failed[0]}", file=sys.stderr)
        return 1
    write_json(json_path, doc)
    print_topology(doc, console, wide=True if wide else None)
    console.print(f"results: {json_path}")
    if doc.get("interrupted"):
        return 128 + signal.Signals[doc["interrupted"]].value
    return 0 if doc["ok"] else 1
