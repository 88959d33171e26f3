"""`eval/gpu_check.py --dry-run`: the GPU check's every step on CPU at toy sizes, so the one command a lent GPU
machine runs is known to work before a GPU is ever lent."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from vlcache_hf.tools import toy

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_section(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "eval" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    assert module.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["errors"] == {}
    rows = report["exactness"]
    assert {(r["family"], r["dtype"]) for r in rows} == {(f, d) for f in toy.FAMILIES for d in ("float32", "bfloat16")}
    assert all(r["full_tokens_equal"] and r["repeat_tokens_equal"] and r["repeat_reused_tokens"] > 0 and r["moved_tokens"] > 0 for r in rows)
    assert {"pageable_GBps", "pinned_GBps"} <= set(report["bandwidth"])
    # an exact repeat from each tier alone, and from a model accelerate split across devices (CPU + disk here)
    assert [r["tier"] for r in report["tiers"]] == ["gpu", "cpu", "disk"]
    assert [r["device_map"] for r in report["device_maps"]] == ["by hand"]
    for row in report["tiers"] + report["device_maps"]:
        assert row["full_tokens_equal"] and row["repeat_tokens_equal"], row
        assert row["repeat_encoder_hits"] == 2 and row["repeat_reused_tokens"] > 0, row
    assert report["device_maps"][0]["placed_on"] == ["cpu", "disk"]
    assert all(ms > 0 for ms in report["benchmark"]["decode_ms_per_token"].values())
    modes = {(r["scenario"], r["mode"]) for r in report["benchmark"]["results"]}
    assert ("a-chat", "hf-prefix") in modes and ("c-reordered", "vlcache 5%") in modes
    assert "## TTFT benchmark" in (tmp_path / "gpu_check_dry_run.md").read_text()
