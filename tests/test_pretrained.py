"""vgg_jax.pretrained: the weight table, download + hash check + conversion + cache, offline reuse, failures,
concurrent first calls, notop and timm files, and the README's "Pretrained weights and features" examples.

Files are random weights in the published layouts (tests/weight_files.py), served from 127.0.0.1.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import weight_files
from markdown_blocks import DOCS, code_blocks
from safetensors.numpy import save_file

import vgg_jax
from vgg_jax import pretrained
from vgg_jax.pretrained import PretrainedError
from vgg_jax.weights import convert
from vgg_jax.weights import formats as weight_formats

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random-weight files named as the published ones: Keras VGG16 (top, notop), VGG19 notop, timm vgg11."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    made = (("vgg16", "D", True, 0), ("vgg16_notop", "D", False, 1), ("vgg19_notop", "E", False, 2))
    for name, variant, head, seed in made:
        entry = pretrained.lookup(name, "keras")
        params = weight_files.random_params(variant, seed, head=head)
        out[name] = weight_files.write_keras_h5(root / entry.filename, params)
    state = weight_files.torchvision_state(weight_files.random_params("A", 3, num_classes=5, crop_size=64))
    out["timm_vgg11_state"] = state
    (root / "timm").mkdir()
    out["timm_vgg11"] = root / "timm" / "model.safetensors"
    save_file(weight_files.timm_state(state, window=2), str(out["timm_vgg11"]))
    out["root"] = root
    return out


def _use_table_entry(monkeypatch, source, name, path, algorithm="md5"):
    """Points the table's hash at a generated file: the check runs exactly as for the published file."""
    key = (source, name)
    digest = weight_files.digest(path, algorithm)
    entry = dataclasses.replace(pretrained.WEIGHTS[key], hash_algorithm=algorithm, digest=digest)
    monkeypatch.setitem(pretrained.WEIGHTS, key, entry)


def _crops(count=2, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_table_is_consistent():
    assert set(pretrained.DEFAULT_SOURCE) <= {name for _, name in pretrained.WEIGHTS}
    for (source, name), entry in pretrained.WEIGHTS.items():
        assert (entry.source, entry.name) == (source, name) and entry.url.startswith("https://")
        if source == "torchvision":  # the prefix is in the file name, as torch.hub reads it
            assert entry.hash_algorithm == "sha256-prefix" and entry.filename == f"{name}-{entry.digest}.pth"
        elif source == "keras":
            assert entry.hash_algorithm == "md5" and re.fullmatch(r"[0-9a-f]{32}", entry.digest)
            assert entry.include_top == ("notop" not in entry.filename)
        else:
            assert source == "timm" and entry.digest is None and entry.filename == "model.safetensors"
    assert pretrained.lookup("vgg16").source == "keras" and pretrained.lookup("vgg11").source == "torchvision"
    assert pretrained.lookup("torchvision/vgg19").variant == "E"
    with pytest.raises(ValueError, match="available: keras/vgg16"):
        pretrained.lookup("vgg16_bn")


def test_download_check_convert_cache_then_offline(files, tmp_path, monkeypatch):
    _use_table_entry(monkeypatch, "keras", "vgg16", files["vgg16"])
    cache = tmp_path / "cache"
    with weight_files.serve(files["root"]) as server:
        monkeypatch.setenv(pretrained.URL_ENV, server.url)
        clf = vgg_jax.pretrained("vgg16", cache_dir=cache)
        assert server.requests == [f"/{files['vgg16'].name}"]
        again = vgg_jax.pretrained("vgg16", cache_dir=cache)  # cached: no second request
        assert len(server.requests) == 1
    assert sorted(p.name for p in cache.iterdir()) == [".keras-vgg16.lock", "keras-vgg16"]  # no temp files left
    record = json.loads((cache / "keras-vgg16" / pretrained.MARKER).read_text())
    assert record["checked"]["algorithm"] == "md5" and record["sha256"] == weight_files.digest(files["vgg16"])
    # ImageNet classes: WordNet ids and names, so predict prints names.
    assert clf.num_classes == 1000 and clf.class_names[:2] == ["tench", "goldfish"]
    assert clf.config.class_wnids[0] == "n01440764" and len(set(clf.config.class_wnids)) == 1000
    crops = _crops()
    prediction = clf.predict(crops, top_k=3)
    assert all(name in clf.class_names for row in prediction.names for name in row)
    np.testing.assert_array_equal(again.logits(crops), clf.logits(crops))
    # The server is gone: the cache alone serves the weights.
    offline = vgg_jax.pretrained("vgg16", cache_dir=cache)
    np.testing.assert_array_equal(offline.logits(crops), clf.logits(crops))


def test_corrupt_truncated_and_unreachable_downloads_cache_nothing(files, tmp_path, monkeypatch):
    _use_table_entry(monkeypatch, "keras", "vgg16_notop", files["vgg16_notop"])
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    data = bytearray(files["vgg16_notop"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (corrupt_dir / files["vgg16_notop"].name).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with weight_files.serve(corrupt_dir) as server:
        with pytest.raises(PretrainedError, match="md5 is [0-9a-f]{32}, expected .*corrupt.*nothing was cached"):
            vgg_jax.pretrained("vgg16_notop", cache_dir=cache, url=f"{server.url}/{files['vgg16_notop'].name}")
    with weight_files.serve(files["root"]) as server:
        with pytest.raises(PretrainedError, match="incomplete|failed after"):
            truncated = f"{server.url}/truncated/{files['vgg16_notop'].name}"
            vgg_jax.pretrained("vgg16_notop", cache_dir=cache, url=truncated)
        url = server.url
    with pytest.raises(PretrainedError, match="could not download .*Offline"):
        vgg_jax.pretrained("vgg16_notop", cache_dir=cache, url=f"{url}/{files['vgg16_notop'].name}")
    with pytest.raises(PretrainedError, match="not found"):
        vgg_jax.pretrained("vgg16_notop", cache_dir=cache, url=str(tmp_path / "missing.h5"))
    assert [p.name for p in cache.iterdir()] == [".keras-vgg16_notop.lock"]  # no run directory, no temp file


def test_unknown_hash_is_refused_and_sha256_argument_verifies(files, tmp_path):
    cache = tmp_path / "cache"
    with weight_files.serve(files["root"]) as server:
        url = f"{server.url}/timm/model.safetensors"
        with pytest.raises(PretrainedError, match="knows no verified hash for timm/vgg11.*sha256="):
            vgg_jax.pretrained("vgg11", source="timm", cache_dir=cache, url=url)
        assert server.requests == []  # refused before downloading anything
        with pytest.raises(PretrainedError, match="sha256 is .*expected 0{64}"):
            vgg_jax.pretrained("vgg11", source="timm", cache_dir=cache, url=url, sha256="0" * 64)
        sha256 = weight_files.digest(files["timm_vgg11"])
        clf = vgg_jax.pretrained("vgg11", source="timm", cache_dir=cache, url=url, sha256=sha256)
    assert (cache / f"timm-vgg11-sha256-{sha256[:16]}" / pretrained.MARKER).is_file()
    assert clf.num_classes == 5 and clf.class_names is None and clf.config.preprocessing.source == "timm"
    # timm's layout (fc6/fc7 as convolutions, head.fc) gives exactly what torchvision's does, without torch.
    params = weight_formats.from_torchvision_state_dict(files["timm_vgg11_state"], "A")
    for layer in params:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(clf.params[layer][leaf], params[layer][leaf])


def test_notop_converts_features_work_classifier_says_absent(files, tmp_path):
    path = files["vgg19_notop"]
    clf = vgg_jax.pretrained("vgg19_notop", cache_dir=tmp_path, url=str(path), sha256=weight_files.digest(path))
    assert clf.config.model.include_top is False and "fc6" not in clf.params
    features = clf.features(_crops(1), layer=["relu1_1", "pool5"])
    assert features["relu1_1"].shape == (1, 224, 224, 4) and features["pool5"].shape == (1, 7, 7, 32)
    for call in (lambda: clf.predict(_crops(1)), lambda: clf.logits(_crops(1)), lambda: clf.features(_crops(1), "fc7")):
        with pytest.raises(ValueError, match="no classifier head .*notop"):
            call()
    with pytest.raises(PretrainedError, match="lacks the classifier"):  # a notop file where the full one belongs
        vgg_jax.pretrained("vgg19", cache_dir=tmp_path, url=str(path), sha256=weight_files.digest(path))


_WORKER = """
import logging, pathlib, sys, time
from vgg_jax import pretrained
logging.basicConfig(level=logging.INFO)
barrier = pathlib.Path(sys.argv[4])
(barrier / sys.argv[5]).touch()
while len(list(barrier.iterdir())) < 2:  # both processes imported: start together
    time.sleep(0.05)
run = pretrained.fetch("vgg16_notop", "keras", cache_dir=sys.argv[1], url=sys.argv[2], sha256=sys.argv[3])
print("RUN", run)
"""


def test_concurrent_first_calls_convert_once(files, tmp_path):
    """Two processes ask at once: one downloads and converts under the lock, the other waits and reuses it."""
    path = files["vgg16_notop"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    (tmp_path / "barrier").mkdir()
    with weight_files.serve(files["root"], delay=1.0) as server:  # the download takes ≥ 1 s: the calls overlap
        args = [
            str(tmp_path / "cache"),
            f"{server.url}/{path.name}",
            weight_files.digest(path),
            str(tmp_path / "barrier"),
        ]
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, *args, str(index)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index in range(2)
        ]
        outputs = [worker.communicate(timeout=600) for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], outputs
        assert server.requests == [f"/{path.name}"]  # one download (and so one conversion)
    runs = {line for out, _ in outputs for line in out.splitlines() if line.startswith("RUN ")}
    assert len(runs) == 1
    assert sum("another process is downloading" in err for _, err in outputs) == 1  # one waited on the lock


# The README's and docs' pretrained examples run full-size VGG-16 and VGG-19 at 224 px; the fast tier
# downloads, checks, converts and loads through the same calls (test_download_check_convert_cache_then_offline
# and the tests around it)
@pytest.mark.slow
def test_readme_pretrained_section_runs_offline(files, tmp_path, monkeypatch):
    """The README's "Pretrained weights and features" code and docs/pretrained.md's, against a cache filled
    from a local server (random weights in the published layouts), with the server stopped: the offline path
    users get."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Pretrained weights and features", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no Python example in the README section"
    page = code_blocks(DOCS / "pretrained.md", "python")
    assert page, "no Python example in docs/pretrained.md"
    blocks += page
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    with weight_files.serve(files["root"]) as server:
        monkeypatch.setenv(pretrained.URL_ENV, server.url)
        for name in ("vgg16", "vgg16_notop", "vgg19_notop"):
            _use_table_entry(monkeypatch, "keras", name, files[name])
            vgg_jax.pretrained.fetch(name)
    rng = np.random.default_rng(0)
    namespace = dict(
        crops=rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
        images=rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8),
        photos=rng.integers(0, 256, (2, 72, 64, 3), dtype=np.uint8),
    )
    for block in blocks:
        exec(compile(textwrap.dedent(block), "README.md", "exec"), namespace)  # noqa: S102
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["per_image"].shape == namespace["smoother"].shape == (len(namespace["images"]),)


@pytest.mark.slow  # executes the notebook; its README section runs in the test above
def test_example_notebook_runs(monkeypatch):
    """examples/pretrained.ipynb (committed with its outputs) runs top to bottom offline (nbclient), from
    examples/ as a user opens it there."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = REPO / "examples" / "pretrained.ipynb"
    committed = nbformat.read(path, as_version=4)
    assert all(cell.get("outputs") for cell in committed.cells if cell.cell_type == "code"), "commit it executed"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(
        committed, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "examples")}}
    )
    client.execute()
    outputs = [output for cell in committed.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    assert "classes: 1000 e.g. [('n01440764', 'tench')" in text and "loaded from the cache: True" in text
    names = set(convert.imagenet_classes()[1])
    predicted = re.search(r"^0: (.*)$", text, flags=re.M).group(1)
    assert all(item.rsplit(" ", 1)[0] in names for item in predicted.split(", "))
    losses = [float(value) for value in re.findall(r"after step \d: (\S+)", text)]
    start = float(re.search(r"cat vs astronaut: (\S+)", text).group(1))
    assert len(losses) == 3 and losses[-1] < start  # gradient steps lower the style loss


def test_torchvision_file_checked_by_the_sha256_prefix_in_its_name(files, tmp_path, monkeypatch):
    """torchvision's check (what torch.hub does): the file's SHA-256 starts with the 8 hex digits of its name."""
    path = files["vgg16_notop"]
    prefix = weight_files.digest(path)[:8]
    pretrained.download(str(path), tmp_path / "ok", "sha256-prefix", prefix)
    wrong = f"{(int(prefix, 16) + 1) % 16**8:08x}"
    with pytest.raises(PretrainedError, match=f"sha256-prefix is {prefix}.*expected {wrong}"):
        pretrained.download(str(path), tmp_path / "bad", "sha256-prefix", wrong)
    torch = pytest.importorskip("torch")
    state = weight_files.torchvision_state(weight_files.random_params("A", 4, num_classes=5, crop_size=64))
    pth = tmp_path / "vgg11.pth"
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, pth)
    name = f"vgg11-{weight_files.digest(pth)[:8]}.pth"  # named as torchvision names its files
    (tmp_path / "mirror").mkdir()
    pth.rename(tmp_path / "mirror" / name)
    entry = dataclasses.replace(
        pretrained.WEIGHTS["torchvision", "vgg11"], url=f"https://example.invalid/{name}", digest=name[6:14]
    )
    monkeypatch.setitem(pretrained.WEIGHTS, ("torchvision", "vgg11"), entry)
    monkeypatch.setenv(pretrained.URL_ENV, str(tmp_path / "mirror"))  # a local directory as the mirror
    clf = vgg_jax.pretrained("vgg11", cache_dir=tmp_path / "cache")
    assert clf.config.preprocessing.source == "torchvision" and clf.num_classes == 5
