"""The command line: `vlcache demo` and `vlcache bench --smoke` run end to end."""

from __future__ import annotations

import json

from vlcache_hf.tools.bench import MODES
from vlcache_hf.tools.cli import main


def test_demo_prints_every_turn(capsys):
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("== turn") == 3
    assert "same as plain generate: yes" in out  # turn 1 is exact in every policy
    assert "encoder hits 2/2" in out  # turn 3 re-uses both images
    # plain generate's answer beside VLCache's, every turn; one line says when and why reuse is approximate
    assert out.count("   plain generate: ") == 3 and out.count("   VLCache: ") == 3
    turns = out.split("== turn")[1:]
    assert "(reuse exact)" in turns[0] and "(reuse exact)" in turns[1]  # new images, then a growing prefix
    assert "(reuse approximate: " in turns[2]  # the swapped images reuse K/V computed in another context
    note = [line for line in out.splitlines() if line.startswith("reuse: ")]
    assert len(note) == 1 and "another context" in note[0] and "'vlcache' recomputes 5% of them" in note[0]


def test_demo_answers_and_note_per_policy():
    from vlcache_hf.tools.demo import TurnResult, approximation_note, format_results

    assert "equals plain generate" in approximation_note("full")
    assert "recomputes none of them" in approximation_note("none")

    class Report:
        encoder_hits, images, reused_tokens, prefix_tokens, moved_tokens = 2, 2, 30, 0, 32
        recomputed_tokens, total_tokens = 71, 101

    turn = TurnResult("turn 3", "circle", False, 1.0, 1.0, Report(), "circle", plain_answer="triangle")
    text = format_results("m", "vlcache", [turn], 0.05)
    assert "plain generate: 'triangle'" in text and "VLCache:        'circle'" in text
    assert "same as plain generate: no (reuse approximate: 32 image tokens" in text


def test_bench_smoke_has_every_mode_and_scenario(tmp_path, capsys):
    assert main(["bench", "--smoke", "--out", str(tmp_path), "--name", "smoke"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "noise" in warnings[0]  # one repeat: said once, in one line
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
    assert "noise" in data["warning"] and data["command"] == "vlcache bench --smoke --out " + f"{tmp_path} --name smoke"
    table = (tmp_path / "smoke.md").read_text()
    assert "speedup vs full †" in table and table.rstrip().splitlines()[-1].startswith("† ")


def test_bench_force_overwrites_one_run_and_leaves_no_stale_plot(tmp_path, capsys):
    stale = tmp_path / "one_growth.png"  # a plot of an earlier --sweep run under the same name
    stale.write_bytes(b"old")
    args = ["bench", "--smoke", "--scenarios", "d", "--modes", "full", "--out", str(tmp_path), "--name", "one"]
    assert main(args) == 2 and stale.exists()
    assert main([*args, "--force"]) == 0
    assert not stale.exists() and (tmp_path / "one.json").exists() and (tmp_path / "one_speedup.png").exists()
