"""The command line: `vlcache demo` and `vlcache bench --smoke` run end to end."""

from __future__ import annotations

import json

from vlcache_hf.bench import MODES
from vlcache_hf.cli import main


def test_demo_prints_every_turn(capsys):
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("== turn") == 3
    assert "same as plain generate: yes" in out  # turn 1 is exact in every policy
    assert "encoder hits 2/2" in out  # turn 3 re-uses both images


def test_bench_smoke_has_every_mode_and_scenario(tmp_path, capsys):
    assert main(["bench", "--smoke", "--out", str(tmp_path), "--name", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    seen = {(r["scenario"], r["mode"]) for r in data["results"]}
    scenarios = {s for s, _ in seen}
    assert scenarios == {"a-chat", "b-new-question", "c-reordered", "d-cold"}
    assert data["skipped_modes"] == []  # every policy of the benchmark is registered, vlcache 2 % / 5 % included
    for mode in MODES:
        expected = {"a-chat", "b-new-question", "c-reordered"}
        if mode.name in ("full", "naive"):
            expected.add("d-cold")
        for scenario in expected:
            assert (scenario, mode.name) in seen, (scenario, mode.name)
    assert (tmp_path / "smoke.md").exists() and (tmp_path / "smoke_speedup.png").exists()
    for row in data["results"]:
        assert row["ttft"]["median"] > 0
