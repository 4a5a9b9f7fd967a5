"""keep_freed_memory: after it, re-allocating a freed 64 MiB tensor no longer page-faults it in again."""
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
import anp_fast.engine  # loaded in every real run; with torch alone glibc still faulted 6 of 10 cycles in
if sys.argv[1] == "keep":
    from anp_fast.cpu_memory import keep_freed_memory
    assert keep_freed_memory()
def cycle():
    t = torch.empty(16 * 1024 * 1024)  # 64 MiB
    t.fill_(1.0)                        # touch every page
    del t
cycle(); cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())
    default, kept = faults("default"), faults("keep")
    pages = 10 * 64 * 1024 * 1024 // 4096
    assert default > pages // 2  # by default every cycle faults its pages in again (glibc returns them)
    assert kept < default // 4  # measured: one cycle's pages at most, against all ten
