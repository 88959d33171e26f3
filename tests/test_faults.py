"""The bounded CI subset of the store fault-injection campaign (`eval/faults.py --faults 30`).

It runs as its own process (it forks writers, kills a real redis-server and, as root, mounts a 300 KiB
tmpfs) and must report every fault kind injected, every answer equal to plain `generate`, and no crash.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fault_campaign_30_faults_no_wrong_answer_no_crash():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is required (apt-get install redis-server; .ci/run installs it)")
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "faults.py"), "--faults", "30", "--seed", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    out = run.stdout
    print(out)
    totals = {k: int(v) for k, v in re.findall(r"^(faults injected|wrong answers|crashes): (\d+)$", out, re.M)}
    assert totals == {"faults injected": 30, "wrong answers": 0, "crashes": 0}, out + run.stderr[-3000:]
    assert run.returncode == 0
    kinds = dict(re.findall(r"(\w+) (\d+)", re.search(r"^faults by kind: (.*)$", out, re.M).group(1)))
    assert len(kinds) == 12 and all(int(n) >= 2 for n in kinds.values())  # every kind, twice at least
    errors = dict(re.findall(r"(\w+) (\d+)", re.search(r"^store errors per tier: (.*)$", out, re.M).group(1)))
    assert int(errors["disk"]) > 0 and int(errors["redis"]) > 0  # the faults did reach the tiers
    requests = int(re.search(r"^requests: (\d+)", out, re.M).group(1))
    hits = int(re.search(r"kv hits: (\d+)", out).group(1))
    assert requests >= 30 and hits > 0
