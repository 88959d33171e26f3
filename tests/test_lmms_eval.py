"""lmms-eval integration: the `vlcache` model runs the local `synthetic_vqa` task end to end through
lmms-eval's own command line, and its loglikelihood through a VLCache equals a plain forward's.

The model is the embedded checkpoint (`pretrained=default`); set VLCACHE_TEST_MODEL to another model
directory (e.g. a development checkpoint) to use that instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlcache_hf.integrations.lmms_eval import (
    CLASS_PATH,
    MODEL_ID,
    LoglikelihoodResult,
    VLCacheLMM,
    build_content,
    manifests,
    register,
    summarize,
)
from vlcache_hf.tools import synthetic

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "tasks"
MODEL = os.environ.get("VLCACHE_TEST_MODEL", "default")
LIMIT = 8
ENTRY_POINT = f"{MODEL_ID} = vlcache_hf.integrations.lmms_eval:manifests"


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A directory with a distribution that declares our `lmms_eval.models` entry point.

    This is the entry point `pyproject.toml` declares; putting it on PYTHONPATH makes lmms-eval discover the
    model the same way whether or not vlcache-hf itself is pip-installed (a duplicate registration of the
    same manifest is harmless).
    """
    root = tmp_path_factory.mktemp("plugin")
    info = root / "vlcache_hf_lmms_eval_plugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlcache-hf-lmms-eval-plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
    return root


def _env(plugin_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(plugin_dir), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_datasets")
    return env


def _metric(output_dir: Path, output: str, task: str = "synthetic_vqa") -> float:
    """exact_match of `task` from the results JSON lmms-eval wrote, and from its printed table.

    lmms-eval exits 0 even when evaluation failed ("Error during evaluation", an import error), so the run
    only counts when it wrote a results file with our task's metric and printed the same figure.
    """
    assert "Error during evaluation" not in output and "Traceback" not in output, output[-3000:]
    found = [
        float(results[task]["exact_match,none"])
        for path in sorted(output_dir.rglob("*results*.json"))
        if task in (results := json.loads(path.read_text()).get("results", {}))
    ]
    assert len(found) == 1, f"expected one results file with {task}, found {len(found)}:\n{output[-3000:]}"
    match = re.search(rf"\|{task}\s*\|none\s*\|\s*\d+\|exact_match\|[^|]*\|\s*([0-9.]+)\|", output)
    assert match, f"no {task} exact_match in the printed table:\n{output[-3000:]}"
    assert float(match.group(1)) == pytest.approx(found[0], abs=1e-4)
    return found[0]


@pytest.mark.parametrize(
    ("pretrained", "task", "policy"),
    [(MODEL, "synthetic_vqa", "full"), (MODEL, "synthetic_vqa", "vlcache"), ("deep", "synthetic_vqa_deep", "coverage")],
)
def test_lmms_eval_runs_synthetic_vqa(pretrained, task, policy, plugin_dir, tmp_path):
    stats = tmp_path / "stats.json"
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", "vlcache",
        "--model_args", f"pretrained={pretrained},policy={policy},stats_path={stats}",
        "--tasks", task,
        "--include_path", str(TASKS),
        "--limit", str(LIMIT),
        "--output_path", str(output),
        "--verbosity", "WARNING",
    ]  # fmt: skip
    # run from elsewhere: the task must find its parquet files by itself
    run = subprocess.run(command, cwd=tmp_path, env=_env(plugin_dir, tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    accuracy = _metric(output, run.stdout + run.stderr, task)
    assert 0.0 <= accuracy <= 1.0
    summary = json.loads(stats.read_text())["summary"]
    print(f"\nlmms-eval {task} --limit {LIMIT}, {pretrained}, policy {policy}: exact_match {accuracy:.3f}; {summary}")
    assert summary["requests"] == LIMIT and summary["policy"] == policy
    assert summary["encoder_hit_rate"] == 1.0  # the warmup published every image's encoder output
    if policy == "full":
        assert summary["recomputed_fraction_tokens"] == 1.0
    else:  # the warmup published the images' K/V: the request reuses them at new positions
        assert summary["kv_hit_rate"] == 1.0
        assert summary["recomputed_fraction_tokens"] < 1.0


@pytest.fixture(scope="module")
def full_lm():
    return VLCacheLMM(pretrained=MODEL, policy="full", warmup=False)


def _task_utils():
    spec = importlib.util.spec_from_file_location("synthetic_vqa_utils", TASKS / "synthetic_vqa" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context(item: synthetic.Item) -> str:
    """The task's `doc_to_text` for this item (its text, with an `<image>` placeholder per picture)."""
    return _task_utils().doc_to_text({"record": json.dumps(item.to_record())})


def test_loglikelihood_full_policy_equals_plain_forward(full_lm):
    model, processor = full_lm.model, full_lm.processor
    first, second = synthetic.make_split("test", 2)
    # a one-token continuation (the answer) and a many-token one
    for item, continuation in ((first, first.answer), (second, f"{second.answer}, because I looked at it.")):
        images = [synthetic.render(scene) for scene in item.scenes]
        logprobs, greedy, stats = full_lm.continuation_logprobs(_context(item), continuation, images)
        assert stats.recomputed_fraction == 1.0

        prompt = processor.apply_chat_template(synthetic.messages(item, images), add_generation_prompt=True)
        # the task's prompt, as the vlcache model builds it, is the one the model was trained on
        assert full_lm._prompt(full_lm.messages(_context(item), images)) == prompt
        context_len = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
        inputs = processor(text=[prompt + continuation], images=images, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        targets = inputs["input_ids"][0, context_len:]
        reference = torch.log_softmax(logits[context_len - 1 : -1], -1).gather(-1, targets[:, None])[:, 0]
        assert logprobs.shape == reference.shape and len(reference) >= 1
        torch.testing.assert_close(logprobs, reference, atol=1e-4, rtol=0)
        assert torch.equal(greedy, logits[context_len - 1 : -1].argmax(-1) == targets)
        # what `loglikelihood` returns, as lmms-eval's models do: the mean negative log-likelihood per token
        loss, all_greedy, _ = full_lm.score(_context(item), continuation, images)
        assert loss == pytest.approx(-float(reference.mean()), abs=1e-4) and all_greedy == bool(greedy.all())


def test_loglikelihood_requests_through_the_lmms_interface():
    """`loglikelihood` on lmms-eval Instances: warmup, then a VLCache prefill that reuses the images' K/V."""
    from lmms_eval.api.instance import Instance

    lm = VLCacheLMM(pretrained=MODEL, policy="vlcache")
    item = synthetic.make_split("test", 1)[0]
    doc = {"images": [synthetic.render(scene) for scene in item.scenes]}
    lm.task_dict = {"synthetic_vqa_mc": {"test": [doc]}}
    choices = ["red", "blue"]
    metadata = {"task": "synthetic_vqa_mc", "doc_id": 0, "repeats": 1}
    arguments = [(_context(item), choice, lambda d: d["images"], 0, "synthetic_vqa_mc", "test") for choice in choices]
    requests = [Instance("loglikelihood", args, idx=i, metadata=metadata) for i, args in enumerate(arguments)]
    results = lm.loglikelihood(requests)
    assert len(results) == 2
    from lmms_eval.api.instance import unwrap_generation_output

    for result in results:
        loss, greedy = result  # a plain (float, bool) pair: lmms-eval's (mean NLL per token, greedy) ...
        assert isinstance(result, tuple) and loss > 0 and isinstance(greedy, bool)
        # ... that lmms-eval's evaluator passes through unchanged (it stringifies other non-text responses)
        assert unwrap_generation_output(result)[0] == (loss, greedy)
    summary = summarize([s for s in lm.stats if s.task == "synthetic_vqa_mc"])
    assert summary["requests"] == 2 and summary["kv_hit_rate"] == 1.0 and summary["encoder_hit_rate"] == 1.0
    assert summary["recomputed_fraction_tokens"] < 1.0


def test_images_go_where_the_placeholders_are():
    a, b, c = object(), object(), object()
    content = build_content("Look. <image><image> Which?", [a, b])
    assert [p.get("text", p.get("image")) for p in content] == ["Look. ", a, b, " Which?"]
    content = build_content("<image 2> then <image 1>, again <image 2>", [a, b, c])
    assert [p.get("text", p.get("image")) for p in content] == [c, b, " then ", a, ", again ", "image 2"]
    assert [p.get("text", p.get("image")) for p in build_content("No placeholder.", [a])] == [a, "No placeholder."]
    assert LoglikelihoodResult(-1, 0) == (-1.0, False)


def test_entry_point_manifest_resolves_the_model():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    register(registry)
    assert registry.get_model_class(MODEL_ID) is VLCacheLMM
    assert [m.simple_class_path for m in manifests()] == [CLASS_PATH]

    from importlib.metadata import PackageNotFoundError, distribution

    try:
        installed = distribution("vlcache-hf")
    except PackageNotFoundError:
        return  # running from a source tree (PYTHONPATH=src): nothing installed to check
    names = {ep.name: ep.value for ep in installed.entry_points if ep.group == "lmms_eval.models"}
    assert names.get(MODEL_ID) == "vlcache_hf.integrations.lmms_eval:manifests", "pyproject.toml lacks the entry point"
