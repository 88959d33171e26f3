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
        if mode.kind == "vlcache_processor":  # made by VLCacheProcessor from the chat: the chat scenario only
            expected = {"a-chat"}
        for scenario in expected:
            assert (scenario, mode.name) in seen, (scenario, mode.name)
    assert (tmp_path / "smoke.md").exists() and (tmp_path / "smoke_speedup.png").exists()
    for row in data["results"]:
        assert row["ttft"]["median"] > 0
    processor_row = next(r for r in data["results"] if r["mode"] == "naive + processor")
    assert processor_row["processor_ms"] > 0 and processor_row["recomputed_fraction"] < 1  # its request reused K/V
    assert {(r["scenario"], r["mode"]) for r in data["results"] if r["mode"] == "naive + processor"} == {("a-chat", "naive + processor")}
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


def test_end_to_end_line_adds_each_mode_s_processor_call_to_its_ttft():
    from vlcache_hf.tools.bench import ModeResult, against_hf_prefix

    def row(mode, ttft_s, processor_ms):
        return ModeResult("a-chat", mode, {"median": ttft_s, "min": ttft_s, "max": ttft_s, "n": 3.0}, processor_ms=processor_ms)

    lines = against_hf_prefix([row("hf-prefix", 0.400, 90.0), row("naive", 0.460, 90.0), row("naive + processor", 0.440, 20.0)])
    assert "HF prefix cache 400.0 ms / naive reuse 460.0 ms = 0.87×" in lines[3]
    # TTFT alone 400 / 440 = 0.91×; with the processor call (90 + 400) / (20 + 440) = 490 / 460 = 1.07×
    assert lines[4].endswith("TTFT alone 400.0 / 440.0 ms = 0.91×; processor call + TTFT: HF prefix cache 490.0 ms "
                             "(plain processor 90.0 ms) / naive reuse 460.0 ms (`VLCacheProcessor` 20.0 ms) = 1.07×")
    assert len(against_hf_prefix([row("hf-prefix", 0.4, 90.0), row("naive", 0.46, 90.0)])) == 4  # no processor mode: no line


def test_modes_take_turns_so_drift_weighs_on_every_mode_alike(monkeypatch):
    from vlcache_hf.tools import bench, toy

    model, processor = toy.build_model(), toy.build_processor()
    scenario = bench.build_scenarios(processor, bench.SIZES["smoke"], {"a"})[0]
    seeded = bench._seeded_store(model, scenario, processor)
    order: list[str] = []
    real_request = bench.ModeRunner.request

    def recorded(self):
        order.append(self.mode.name)
        return real_request(self)

    monkeypatch.setattr(bench.ModeRunner, "request", recorded)
    modes = [m for m in bench.MODES if m.name in ("full", "naive", "naive + processor")]
    runs = bench.run_modes(model, scenario, modes, repeats=2, seeded=seeded, measure_memory=False, processor=processor)
    assert order == ["full", "naive", "naive + processor"] * 3  # a warm-up round, then two timed rounds
    assert [len(run.times) for run in runs] == [2, 2, 2] and len(runs[2].processor_seconds) == 2
    assert runs[1].report.reused_tokens > 0 and runs[2].report.encoder_hits == runs[2].report.images  # served from the store


def test_hf_prefix_with_native_gqa_runs_only_when_named_and_forces_it_for_its_requests_only(monkeypatch):
    """The named-only mode is HF prefix caching with transformers' own switch set during its requests (so its
    forward over the new text makes no per-group K/V copies); the switch is unset before and after."""
    import os

    from helpers import RepeatKVCalls

    from vlcache_hf.tools import bench, toy

    assert "hf-prefix + native GQA" not in [m.name for m in bench.available_modes(None)[0]]
    modes, _ = bench.available_modes(["hf-prefix", "hf-prefix + native GQA"])
    assert [m.name for m in modes] == ["hf-prefix", "hf-prefix + native GQA"]
    model, processor = toy.build_model(), toy.build_processor()
    scenario = bench.build_scenarios(processor, bench.SIZES["smoke"], {"a"})[0]
    counter, copies = RepeatKVCalls(monkeypatch), {}
    monkeypatch.delenv(bench.FORCE_GQA_VARIABLE, raising=False)
    for mode in modes:
        runner = bench.ModeRunner(model, scenario, mode, None)
        counter.calls = 0
        runner.request()
        copies[mode.name] = counter.calls
        assert bench.FORCE_GQA_VARIABLE not in os.environ
    assert copies.get("hf-prefix", 0) > 0 and copies.get("hf-prefix + native GQA", 0) == 0
    lines = bench.against_hf_prefix([
        bench.ModeResult("a-chat", "hf-prefix", {"median": 0.4}),
        bench.ModeResult("a-chat", "hf-prefix + native GQA", {"median": 0.3}),
        bench.ModeResult("a-chat", "naive", {"median": 0.32}),
    ])
    assert any("native GQA forced" in line and "= 0.94×" in line for line in lines)
