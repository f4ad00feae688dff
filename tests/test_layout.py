"""The package's shape: no import cycles, modules of a few hundred lines, no TensorFlow behind the notebook API."""

import ast
import pathlib
import re
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vgg_jax"
MAX_MODULE_LINES = 450


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """vgg_jax modules imported at module level (function-level imports run later and cannot cycle at import)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vgg_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vgg_jax"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                found.add(candidate if is_module else node.module)
    return found


def test_no_import_cycles():
    graph = {_module_name(p): _top_level_imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, chain: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            assert state.get(target) != "open", "import cycle: " + " → ".join([*chain, module, target])
            if target not in state:
                visit(target, [*chain, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_modules_stay_a_few_hundred_lines():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_model_preprocessing_and_notebook_api_import_no_tensorflow(tmp_path):
    script = f"""
import sys
import numpy as np
import vgg_jax
from vgg_jax import models, preprocess
from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import common

config = common.get_config("A")
config.model.width_multiplier, config.model.fc_width, config.model.num_classes = 1 / 16, 8, 3
config.crop_size, config.eval_scale, config.dataset = 32, 36, ""
config.class_names, config.preprocessing = ["a", "b", "c"], {{}}  # as converted weights: no data set
model = models.from_config(config)
import jax
params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
checkpoints.save_params_only({str(tmp_path / "run")!r}, params, config)
clf = vgg_jax.load({str(tmp_path / "run")!r})
prediction = clf.predict(np.zeros((2, 32, 32, 3), np.uint8), top_k=2)
assert prediction.class_ids.shape == (2, 2)
print(sorted(name for name in sys.modules if name.split(".")[0] == "tensorflow"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_module_map_lists_every_module():
    """docs/modules.md names every module of the package (paths relative to vgg_jax/), and none that is gone."""
    text = (PACKAGE.parent / "docs" / "modules.md").read_text()
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    modules -= {name for name in modules if name.endswith("/__init__.py")}
    rows = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    listed = set(re.findall(r"`([\w/]+\.py)`", rows))
    assert sorted(modules - listed) == []
    assert sorted(name for name in listed if not (PACKAGE / name).exists()) == []
