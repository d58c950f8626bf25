"""Several vCPUs in one guest process: each keeps its own link and kernel model."""

from __future__ import annotations

import argparse

import pytest
from hostproc import StandaloneHost

from vtick.proto.cliargs import vcpu_list


def test_vcpu_lists_parse_and_refuse_in_one_line() -> None:
    assert vcpu_list("3") == [3]
    assert vcpu_list("0-3") == [0, 1, 2, 3]
    assert vcpu_list("0,2-3,7") == [0, 2, 3, 7]
    for bad in ("", "a", "3-1", "1,1", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            vcpu_list(bad)


@pytest.mark.processes
def test_four_vcpus_in_one_process_each_served_on_its_own_link() -> None:
    host = StandaloneHost(4, 1.0, "--report-timeout", "2")
    try:
        guest = host.guest("0-3")
        code, results, err = host.finish()
        _, gerr = guest.communicate(timeout=20)
        assert guest.returncode == 0, gerr
        assert code == 0, err
        pids = {v["guest_pid"] for v in results["vcpus"]}
        assert pids == {guest.pid}
        for v in results["vcpus"]:
            assert v["guest"]["events"] > 0
            assert v["link_errors"] == []
            assert v["sessions"] == 1
    finally:
        host.cleanup()
