"""``vtick agent``: it owns its machine's processes and leaves nothing behind, whether its
controller says bye, disappears, or the agent itself is killed."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from vtick.host.topology.agent import proc_start_time, sweep

pytestmark = pytest.mark.processes

AGENT = [sys.executable, "-m", "vtick.host", "agent"]
#: a stand-in for a vtick host: READY, then wait (it does not watch its parent)
SLEEPER = [sys.executable, "-c", "import time; print('READY fake', flush=True); time.sleep(60)"]


def alive(pid: int) -> bool:
    state = None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


class AgentProc:
    """An agent as a controller drives it: JSON lines over its stdin/stdout."""

    def __init__(self, base: str) -> None:
        self.proc = subprocess.Popen(
            [*AGENT, "--run-base", base],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.next_event("hello")
        self.run_dir = self.hello["run_dir"]
        self.re = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next_event(self, name: str, timeout: float = 15.0) -> dict:
        for ev in self.events:
            if ev.get("event") == name:
                self.events.remove(ev)
                return ev
        end = time.monotonic() + timeout
        while True:
            obj = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            if obj.get("event") == name:
                return obj
            self.events.append(obj)

    def request(self, op: str, timeout: float = 15.0, **fields) -> dict:
        self.re += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "re": self.re, **fields}) + "\n")
        self.proc.stdin.flush()
        end = time.monotonic() + timeout
        while True:
            obj = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            if obj.get("re") == self.re:
                return obj
            self.events.append(obj)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass  # a pipe whose other end is gone


@pytest.fixture
def agent(tmp_path):
    a = AgentProc(str(tmp_path))
    try:
        yield a
    finally:
        a.kill()
        sweep(a.run_dir, force=True)  # whatever the test left: processes and directory


def test_start_ready_exit_signal_pause_files_and_bye(agent, tmp_path):
    assert agent.hello["vtick"]
    assert os.stat(agent.run_dir).st_mode & 0o777 == 0o700
    ready = agent.request("start", id="h", argv=SLEEPER, ready=True)
    assert ready["ok"]
    assert ready["ready"] == "READY fake"
    host_pid = ready["pid"]
    assert os.getpgid(host_pid) == host_pid  # its own process group
    with open(f"/proc/{host_pid}/environ", "rb") as fh:
        env = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
    assert env[b"VTICK_PARENT_PID"] == str(agent.proc.pid).encode()
    # a process that fails is reported with its status
    crash = agent.request("start", id="crash", argv=[sys.executable, "-c", "raise SystemExit(3)"])
    assert crash["ok"]
    exited = agent.next_event("exited")
    assert (exited["id"], exited["status"]) == ("crash", 3)
    # a fault applied by the agent itself: stopped for the window, then running again
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(agent.request("pause", id="h", seconds=1.0)))
    t.start()
    states = []
    for _ in range(40):  # stopped within the window, whatever the load
        time.sleep(0.02)
        with open(f"/proc/{host_pid}/stat") as fh:
            states.append(fh.read().rsplit(")", 1)[1].split()[0])
        if states[-1] == "T":
            break
    assert states[-1] == "T", states
    t.join(10)
    assert result["ok"]
    assert result["paused_ns"] >= 1_000_000_000
    with open(f"/proc/{host_pid}/stat") as fh:
        assert fh.read().rsplit(")", 1)[1].split()[0] != "T"  # resumed
    # files: only inside the run directory
    put = agent.request("put", name="note.txt", text="hello")
    assert put["path"] == os.path.join(agent.run_dir, "note.txt")
    assert agent.request("fetch", path="{run}/note.txt")["text"] == "hello"
    outside = agent.request("fetch", path=str(tmp_path / "x"))
    assert not outside["ok"]
    assert "not in this agent's run directory" in outside["error"]
    assert not agent.request("put", name="../evil", text="x")["ok"]
    # a signal, and its exit
    assert agent.request("signal", id="h", signal="SIGTERM")["ok"]
    exited = agent.next_event("exited")
    assert (exited["id"], exited["status"]) == ("h", -signal.SIGTERM)
    again = agent.request("start", id="h2", argv=SLEEPER)
    assert not agent.request("start", id="h2", argv=SLEEPER)["ok"]
    # bye: everything it started stops and its directory goes
    assert agent.request("bye")["ok"]
    assert agent.proc.wait(10) == 0
    assert wait_gone(again["pid"])
    assert not os.path.exists(agent.run_dir)


def test_controller_killed_agent_cleans_up(tmp_path):
    """The controller is SIGKILLed mid-run: the agent (in its own session, as the
    controller starts it) sees its stdin close, stops what it started and removes its
    run directory."""
    controller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, subprocess, sys, time\n"
            f"a = subprocess.Popen({[*AGENT, '--run-base', str(tmp_path)]!r}, "
            "stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, "
            "start_new_session=True)\n"
            "hello = json.loads(a.stdout.readline())\n"
            "a.stdin.write(json.dumps({'op': 'start', 're': 1, 'id': 'v', "
            f"'argv': {SLEEPER!r}}}) + '\\n'); a.stdin.flush()\n"
            "reply = json.loads(a.stdout.readline())\n"
            "print(json.dumps([a.pid, reply['pid'], hello['run_dir']]), flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    agent_pid = child_pid = 0
    run_dir = ""
    try:
        assert controller.stdout is not None
        agent_pid, child_pid, run_dir = json.loads(controller.stdout.readline())
        assert alive(child_pid)
        assert os.path.isdir(run_dir)
        controller.kill()  # SIGKILL: no bye, no cleanup of its own
        controller.wait()
        assert wait_gone(agent_pid)
        assert wait_gone(child_pid)
        assert not os.path.exists(run_dir)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
        for pid in (agent_pid, child_pid):
            if pid and alive(pid):
                os.killpg(pid, signal.SIGKILL)
        if run_dir:
            sweep(run_dir, force=True)
        if controller.stdout is not None:
            controller.stdout.close()
    assert os.listdir(tmp_path) == []


def test_controller_gone_agent_alone_cleans_up(tmp_path):
    """Only the controller's end of the pipe goes away (as when ssh drops): the agent
    stops its process and removes its run directory on its own."""
    a = AgentProc(str(tmp_path))
    try:
        child = a.request("start", id="v", argv=SLEEPER)["pid"]
        assert a.proc.stdin is not None
        a.proc.stdin.close()  # end of file on the agent's stdin
        assert a.proc.wait(10) == 0
        assert wait_gone(child)
        assert not os.path.exists(a.run_dir)
    finally:
        a.kill()
        sweep(a.run_dir, force=True)


def test_agent_killed_leftovers_are_swept_by_manifest(tmp_path):
    """SIGKILL the agent: vtick processes would stop on their own (they watch their
    parent); this stand-in does not, and its run directory stays.  The sweep kills what
    the manifest lists (checking each pid's start time) and removes the directory; a new
    agent sweeps a dead agent's directory the same way when it starts."""
    a = AgentProc(str(tmp_path))
    child = a.request("start", id="v", argv=SLEEPER)["pid"]
    with open(os.path.join(a.run_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["processes"]["v"]["pid"] == child
    assert manifest["processes"]["v"]["start_time"] == proc_start_time(child)
    a.kill()
    assert alive(child)
    assert os.path.isdir(a.run_dir)
    b = AgentProc(str(tmp_path))  # starts with a sweep of the dead agent's directory
    try:
        assert wait_gone(child)
        assert not os.path.exists(a.run_dir)
        assert os.listdir(tmp_path) == [os.path.basename(b.run_dir)]
        # a live agent's directory is never swept
        assert not sweep(b.run_dir)
        out = subprocess.run(
            [*AGENT, "--sweep", b.run_dir], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 1
        assert os.path.isdir(b.run_dir)
    finally:
        b.kill()
        assert sweep(b.run_dir)
    assert os.listdir(tmp_path) == []


def test_agent_refuses_bad_arguments(tmp_path):
    out = subprocess.run(
        [*AGENT, "--sweep", str(tmp_path / "none")], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.strip() == f"vtick agent: --sweep {tmp_path / 'none'}: no such directory"
