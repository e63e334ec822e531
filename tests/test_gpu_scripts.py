"""The GPU validation helpers must keep working where no GPU is: run the sanitizer cases on the CPU."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "gpu" / "sanitize_cases.py"


def test_sanitize_cases_run_on_cpu():
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln for ln in r.stdout.splitlines() if ln.endswith(": done")] == [
        "sqa: done", "dma: done", "routing: done", "lightning: done"]
