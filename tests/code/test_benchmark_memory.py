"""The benchmark's peak memory is each worker's own (benchmarks/measure.py), not its parent's.

Linux carries a parent's resident size at fork into the child's ru_maxrss, across exec: a worker started by a
harness holding 800 MB used to report 813 MB. The workers now report VmHWM, reset at their start."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS.parent))

from benchmarks import measure  # noqa: E402

PARENT_EXTRA_MB = 600
CHILD_EXTRA_MB = 64

# What a worker does: reset the high-water mark first, then work (here: touch CHILD_EXTRA_MB and let it go).
CHILD = f"""
import json, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
from measure import peak_rss, reset_peak_rss, rss_mb
method = reset_peak_rss()
block = bytearray({CHILD_EXTRA_MB} * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
del block
print(json.dumps({{**peak_rss(), "rss_mb": rss_mb(), "method": method}}))
"""


def touched(megabytes: int) -> bytearray:
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1  # resident, not just reserved
    return block


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_child_of_a_large_parent_reports_its_own_peak_not_the_parents():
    block = touched(PARENT_EXTRA_MB)
    parent_rss = measure.rss_mb()
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    del block
    child = json.loads(done.stdout)

    assert child["peak_rss_method"] in (measure.VMHWM_RESET, measure.VMHWM)
    # Its own: the parent's extra 600 MB are not in it (the child imports torch as the parent did) ...
    assert child["peak_rss_mb"] < parent_rss - PARENT_EXTRA_MB / 2
    # ... and it is a peak: the 64 MB the child touched and freed are in it, though no longer resident.
    assert child["peak_rss_mb"] >= child["rss_mb"] + CHILD_EXTRA_MB * 0.9


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="clear_refs is Linux's")
def test_the_reset_brings_the_high_water_mark_down_to_the_current_size():
    block = touched(CHILD_EXTRA_MB)
    del block
    assert measure.peak_rss_mb() >= measure.rss_mb() + CHILD_EXTRA_MB * 0.9
    if measure.reset_peak_rss() != measure.VMHWM_RESET:
        pytest.skip("this kernel refuses writes to /proc/self/clear_refs; peaks are VmHWM since exec")
    assert measure.peak_rss_mb() <= measure.rss_mb() + 1


def test_without_proc_the_fallback_says_it_includes_the_parent(monkeypatch):
    monkeypatch.setattr(measure, "_peak_method", measure._peak_method)  # restored after the test
    monkeypatch.setattr(measure, "_status_kb", lambda field: None)
    assert measure.reset_peak_rss() == measure.RU_MAXRSS
    peak = measure.peak_rss()
    assert peak["peak_rss_method"] == measure.RU_MAXRSS and peak["peak_rss_mb"] > 0
