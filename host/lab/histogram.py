"""Lateness histograms in cyclictest's JSON shape (``vtick run --histogram PATH``).

Kernel developers already have scripts that read ``cyclictest --json`` (rt-tests'
``rt_write_json``, shared by every rt-tests tool): a top level with ``file_version``, the
command line, the version, ``start_time``/``end_time``, ``return_code`` and ``sysinfo``,
then ``num_threads``, ``resolution_in_ns`` and ``thread`` = {"0": {"histogram":
{"<bucket>": count, ...}, "cycles", "min", "max", "avg", "cpu", "node"}, ...}.  vtick
writes one such document per timer path, a vCPU in place of a measuring thread, so those
scripts read vtick's lateness unchanged.  Differences, on purpose:

* the command-line and version keys are ``cmdline`` and ``version``: cyclictest writes
  them with a stray colon inside the key (``"cmdline:"``), which is its bug, not its
  format;
* values are microseconds (``resolution_in_ns`` 0, cyclictest's default), a bucket is
  1 µs wide and only non-empty buckets are listed, as cyclictest does; there is no
  overflow bucket because nothing is cut off: the guest's HDR histogram keeps 3
  significant digits, so above about 2 ms a count lands in the bucket of its HDR
  sub-bucket's highest value, as in the tables' percentiles;
* ``path`` and ``vtick`` (the workload, vCPUs, duration and the measured definition)
  are added, which JSON readers ignore.

Pure apart from :func:`write_histograms`, which writes the files.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["cyclictest_document", "histogram_paths", "write_histograms", "FILE_VERSION"]

FILE_VERSION = 1
_TIME_FORMAT = "%a, %d %b %Y %H:%M:%S %z"  # what rt-tests writes for start and end


def _thread(vcpu: int, blob: str) -> dict[str, Any]:
    hist = HdrHistogram.decode(blob.encode("ascii"))
    buckets: dict[int, int] = {}
    for item in hist.get_recorded_iterator():
        # the HDR sub-bucket's highest value, which the tables' percentiles report too
        us = hist.get_highest_equivalent_value(item.value_iterated_to) // 1000
        buckets[us] = buckets.get(us, 0) + item.count_added_in_this_iter_step
    count = hist.get_total_count()
    return {
        "histogram": {str(us): n for us, n in sorted(buckets.items())},
        "cycles": count,
        "min": hist.get_min_value() // 1000 if count else 0,
        "max": hist.get_max_value() // 1000 if count else 0,
        "avg": round(hist.get_mean_value() / 1000, 3) if count else 0.0,
        "cpu": vcpu,
        "node": 0,
    }


def _sysinfo() -> dict[str, Any]:
    uname = os.uname()
    realtime = 0
    try:
        with open("/sys/kernel/realtime") as fh:
            realtime = int(fh.read().strip() or 0)
    except (OSError, ValueError):
        pass
    return {
        "sysname": uname.sysname,
        "nodename": uname.nodename,
        "release": uname.release,
        "version": uname.version,
        "machine": uname.machine,
        "realtime": realtime,
    }


def cyclictest_document(
    campaign: dict[str, Any], run: dict[str, Any], cmdline: str, ended: float
) -> dict[str, Any]:
    """The cyclictest-shaped document of one timer path's lateness."""
    cfg = campaign.get("config", {})
    env = campaign.get("environment", {})
    started = env.get("started")
    try:
        start_text = datetime.strptime(started, "%Y-%m-%dT%H:%M:%S%z").strftime(_TIME_FORMAT)
    except (TypeError, ValueError):
        start_text = ""
    threads = {}
    for v in run["results"]["vcpus"]:
        blob = (v.get("guest") or {}).get("lateness_hdr")
        if blob:
            threads[str(v["vcpu"])] = _thread(v["vcpu"], blob)
    ok = bool(run.get("metrics", {}).get("ok"))
    return {
        "file_version": FILE_VERSION,
        "cmdline": cmdline,
        "version": (env.get("versions") or {}).get("vtick"),
        "start_time": start_text,
        "end_time": datetime.fromtimestamp(ended).astimezone().strftime(_TIME_FORMAT),
        "return_code": 0 if ok else 1,
        "sysinfo": _sysinfo(),
        "num_threads": len(threads),
        "resolution_in_ns": 0,
        "thread": threads,
        "path": run["name"],
        "vtick": {
            "measure": "timer lateness: handler time - requested expiry (guest ktime), us",
            "workload": cfg.get("timer_workload"),
            "vcpus": cfg.get("vcpus"),
            "duration_s": cfg.get("duration_s"),
        },
    }


def histogram_paths(path: str, names: list[str]) -> dict[str, str]:
    """Where each timer path's document goes: ``path`` itself for one path; otherwise
    the path's name before the extension (``lat.json`` -> ``lat.pv-ktime.json``)."""
    if len(names) == 1:
        return {names[0]: path}
    stem, ext = os.path.splitext(path)
    return {name: f"{stem}.{name}{ext or '.json'}" for name in names}


def write_histograms(campaign: dict[str, Any], path: str, cmdline: str) -> list[str]:
    """Write one document per measured timer path; returns the files written."""
    runs = [r for r in campaign.get("runs", []) if r["family"] == "timer" and "results" in r]
    # named after the planned modes, so a failed path does not rename the others' files
    planned = campaign.get("config", {}).get("modes") or [r["name"] for r in runs]
    targets = histogram_paths(path, list(planned))
    ended = time.time()
    written = []
    for run in runs:
        doc = cyclictest_document(campaign, run, cmdline, ended)
        with open(targets[run["name"]], "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        written.append(targets[run["name"]])
    return written
