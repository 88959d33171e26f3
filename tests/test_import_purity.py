"""`import vlcache_hf` is cheap and pure: the runtime never imports the tooling, plotting or evaluation stacks.

Checked in fresh subprocesses (this test process has imported everything already through conftest).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vlcache_hf

#: never imported by the runtime: third-party stacks of the tooling, and the tooling modules themselves
FORBIDDEN_PACKAGES = ("matplotlib", "datasets", "lmms_eval", "evaluate")
FORBIDDEN_MODULES = (
    "vlcache_hf.tools",  # the tooling subpackage and every module in it:
    "vlcache_hf.tools.toy",
    "vlcache_hf.tools.synthetic",
    "vlcache_hf.tools.pretrained",
    "vlcache_hf.tools.demo",
    "vlcache_hf.tools.bench",
    "vlcache_hf.tools.bound",
    "vlcache_hf.tools.cli",
    "vlcache_hf.tools.calibrate_cli",
    "vlcache_hf.tools.store_cli",
    "vlcache_hf.calibration",
    "vlcache_hf.integrations",
)


def loaded_after(statement: str) -> list[str]:
    """Modules in sys.modules of a fresh interpreter after `statement` (the environment is inherited)."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def impurities(modules: list[str]) -> list[str]:
    return [
        name
        for name in modules
        if name.split(".")[0] in FORBIDDEN_PACKAGES
        or any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_MODULES)
    ]


def test_import_vlcache_hf_imports_nothing_heavy():
    modules = loaded_after("import vlcache_hf")
    assert impurities(modules) == []
    assert "torch" not in modules and "transformers" not in modules  # names resolve on first use (PEP 562)


@pytest.mark.parametrize(
    "statement",
    [
        "from vlcache_hf import VLCache, CacheStore",
        "from vlcache_hf import VLCacheProcessor, PrefillReport, POLICIES, supported_families, default_store",
        "import vlcache_hf.cache, vlcache_hf.processor, vlcache_hf.store.store",
    ],
)
def test_runtime_imports_no_tooling(statement):
    assert impurities(loaded_after(statement)) == []



def test_the_calibration_pass_loads_no_tooling():
    """`calibrate` is runtime: it and the probe machinery it measures with (`vlcache_hf.probe`, itself not
    forbidden) load no tooling module and no tooling stack, even transitively."""
    modules = loaded_after("import vlcache_hf.calibration, vlcache_hf.probe")
    assert "vlcache_hf.probe" in modules
    assert [name for name in impurities(modules) if name != "vlcache_hf.calibration"] == []

def test_every_public_name_resolves_and_is_listed():
    for name in vlcache_hf.__all__:
        assert getattr(vlcache_hf, name) is not None, name
    assert set(vlcache_hf.__all__) <= set(dir(vlcache_hf))
    assert "importlib" not in dir(vlcache_hf)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        vlcache_hf.NoSuchName  # noqa: B018
    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.cache import VLCache as direct
    from vlcache_hf.store.store import CacheStore as direct_store

    assert VLCache is direct and CacheStore is direct_store


def test_lazy_table_and_type_checking_imports_agree_with_all():
    """`_LAZY` (runtime), the `if TYPE_CHECKING:` imports (type checkers) and `__all__` name the same things."""
    tree = ast.parse(Path(vlcache_hf.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {
        alias.asname or alias.name: "." * node.level + (node.module or "")
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == vlcache_hf._LAZY
    assert set(vlcache_hf.__all__) == set(vlcache_hf._LAZY) | {"__version__"}
    # runtime names only: no public name is re-exported from the tooling or the integrations
    assert not [m for m in vlcache_hf._LAZY.values() if m.startswith((".tools", ".integrations"))]


def test_py_typed_is_shipped():
    package = Path(vlcache_hf.__file__).parent
    assert (package / "py.typed").is_file()
    pyproject = (package.parents[1] / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject
