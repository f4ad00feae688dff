"""Published VGG weights in one call: download, verify, convert once, cache (paper §2 networks, Table 1).

`WEIGHTS` is the one table of files and their hashes: the MD5 ``keras.applications`` pins (Keras
publishes no SHA-256), the SHA-256 prefix in torchvision's file names; timm's files have no verified
hash and need ``sha256=``. The first call downloads to a temporary file, checks the hash, converts it
with `vgg_jax.weights.convert` into a temporary run directory and renames that into the cache under a
file lock, so an entry is complete or absent and concurrent first calls convert once; later calls stay
offline. Usage, mirrors and the cache: docs/pretrained.md.

This module is callable (``vgg_jax.pretrained(...)`` is `pretrained`): importing a submodule named
like a package attribute would otherwise replace the function with the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

CACHE_ENV = "VGG_JAX_CACHE"
URL_ENV = "VGG_JAX_WEIGHTS_URL"
MARKER = "pretrained.json"  # written into a run directory before it is renamed into the cache
_CHUNK = 1 << 20


class PretrainedError(RuntimeError):
    """A download failed, was incomplete, did not match its hash, or cannot be verified; nothing was cached."""


@dataclasses.dataclass(frozen=True)
class PublishedWeights:
    """One published weight file: where it is, how to check it, what it holds.

    `hash_algorithm` is 'md5' or 'sha256' (the whole digest), 'sha256-prefix'
    (the leading hex digits of the SHA-256, as in torchvision file names) or
    None: no verified hash is known, and downloading needs an explicit sha256.
    """

    source: str
    name: str
    variant: str
    url: str
    hash_algorithm: str | None
    digest: str | None
    include_top: bool = True

    @property
    def filename(self) -> str:
        return urllib.parse.urlparse(self.url).path.rsplit("/", 1)[-1]

    @property
    def key(self) -> str:
        return f"{self.source}-{self.name}"


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications"
_TORCHVISION = "https://download.pytorch.org/models"
_HF = "https://huggingface.co/timm"


def _keras(name: str, variant: str, md5: str, notop: bool) -> PublishedWeights:
    base = name.split("_")[0]
    suffix = "_notop" if notop else ""
    url = f"{_KERAS}/{base}/{base}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    return PublishedWeights("keras", name, variant, url, "md5", md5, include_top=not notop)


def _torchvision(name: str, variant: str, prefix: str) -> PublishedWeights:
    url = f"{_TORCHVISION}/{name}-{prefix}.pth"
    return PublishedWeights("torchvision", name, variant, url, "sha256-prefix", prefix)


def _timm(name: str, variant: str) -> PublishedWeights:
    # The name says it: timm's tv_in1k are torchvision's weights, stored as safetensors in timm's layout.
    return PublishedWeights("timm", name, variant, f"{_HF}/{name}.tv_in1k/resolve/main/model.safetensors", None, None)


# The one table. Keras MD5s: `file_hash` in keras/src/applications/vgg16.py and vgg19.py (keras 3.15).
# torchvision prefixes: the file names in torchvision/models/vgg.py (torchvision 0.29), checked by torch.hub.
WEIGHTS: dict[tuple[str, str], PublishedWeights] = {
    (w.source, w.name): w
    for w in (
        _keras("vgg16", "D", "64373286793e3c8b2b4e3219cbf3544b", notop=False),
        _keras("vgg16_notop", "D", "6d6bbae143d832006294945121d1f1fc", notop=True),
        _keras("vgg19", "E", "cbe5617147190e668d6c5d5026f83318", notop=False),
        _keras("vgg19_notop", "E", "253f8cb515780f3b799900260a226db6", notop=True),
        _torchvision("vgg11", "A", "8a719046"),
        _torchvision("vgg13", "B", "19584684"),
        _torchvision("vgg16", "D", "397923af"),
        _torchvision("vgg19", "E", "dcbb9e9d"),
        _timm("vgg11", "A"),
        _timm("vgg13", "B"),
        _timm("vgg16", "D"),
        _timm("vgg19", "E"),
    )
}
# `source=None`: the authors' own weights (via Keras) where they exist, torchvision's otherwise.
DEFAULT_SOURCE = {"vgg11": "torchvision", "vgg13": "torchvision"} | {
    name: "keras" for name in ("vgg16", "vgg19", "vgg16_notop", "vgg19_notop")
}


def available() -> list[str]:
    """'source/name' of every entry of `WEIGHTS`."""
    return [f"{source}/{name}" for source, name in WEIGHTS]


def lookup(name: str, source: str | None = None) -> PublishedWeights:
    """The table entry for `name` ('vgg16', 'vgg19_notop', …) from `source` (None: `DEFAULT_SOURCE`)."""
    if source is None and "/" in name:
        source, name = name.split("/", 1)
    source = source or DEFAULT_SOURCE.get(name)
    entry = WEIGHTS.get((source, name)) if source else None
    if entry is None:
        raise ValueError(f"no published weights {source or '?'}/{name}; available: {', '.join(available())}")
    return entry


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache_dir`, else $VGG_JAX_CACHE, else $XDG_CACHE_HOME/vgg_jax (~/.cache/vgg_jax)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vgg_jax"
        )
    return pathlib.Path(cache_dir).expanduser()


def resolve_url(entry: PublishedWeights, url: str | None = None) -> str:
    """`url`, else $VGG_JAX_WEIGHTS_URL + the file name, else the published URL."""
    if url:
        return str(url)
    base = os.environ.get(URL_ENV)
    if base:
        return f"{base.rstrip('/')}/{entry.filename}"
    return entry.url


def _expected_hash(entry: PublishedWeights, sha256: str | None) -> tuple[str, str]:
    if sha256:
        digest = sha256.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        return "sha256", digest
    if entry.hash_algorithm is None or entry.digest is None:
        raise PretrainedError(
            f"vgg_jax knows no verified hash for {entry.source}/{entry.name} ({entry.url}), so it will not download "
            f"it: pass sha256='<64 hex digits>' (the file's SHA-256 as its host publishes it; for the Hugging Face "
            f"hub, the 'SHA256' of the LFS file on its page), or use source='torchvision' (hash-checked)"
        )
    return entry.hash_algorithm, entry.digest.lower()


def _open(url: str) -> tuple[Any, int | None]:
    """A readable stream for `url` (http(s), file:// or a local path) and its length when known."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("", "file"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(url).path) if scheme == "file" else url
        if not os.path.isfile(path):
            raise PretrainedError(f"local weight file {path} not found")
        return open(path, "rb"), os.path.getsize(path)
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http(s) only: the schemes are checked)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise PretrainedError(
            f"could not download {url}: {error}. Offline? Set {URL_ENV} to a mirror or local directory holding "
            f"the same file, or pass url= a local copy"
        ) from error
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None


def download(url: str, target: pathlib.Path, algorithm: str, digest: str) -> str:
    """Copies `url` to `target`, hashing on the way; raises PretrainedError unless complete and matching.

    Returns the file's SHA-256 (recorded in the cache entry whatever the algorithm checked).
    """
    hashers = {"sha256": hashlib.sha256()}
    if algorithm == "md5":
        hashers["md5"] = hashlib.md5()  # noqa: S324 (Keras publishes MD5s only; it checks integrity here)
    stream, length = _open(url)
    received, last_log = 0, time.monotonic()
    try:
        with stream, open(target, "wb") as out:
            while chunk := stream.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                if time.monotonic() - last_log > 10:
                    total = f" of {length / 1e6:.0f}" if length else ""
                    logging.info("downloading %s: %.0f%s MB", url, received / 1e6, total)
                    last_log = time.monotonic()
    except (OSError, http.client.HTTPException) as error:  # a dropped connection mid-file (IncompleteRead)
        raise PretrainedError(f"download of {url} failed after {received} bytes: {error}") from error
    if length is not None and received != length:
        raise PretrainedError(f"download of {url} is incomplete: {received} of {length} bytes")
    actual = hashers["md5" if algorithm == "md5" else "sha256"].hexdigest()
    matches = actual.startswith(digest) if algorithm == "sha256-prefix" else actual == digest
    if not matches:
        raise PretrainedError(
            f"{url}: {algorithm} is {actual}, expected {digest}: the file is corrupt, truncated or not the "
            f"published one ({received} bytes); nothing was cached"
        )
    return hashers["sha256"].hexdigest()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path, timeout: float) -> Iterator[None]:
    """An exclusive lock between processes (and threads: flock locks belong to each open file)."""
    import fcntl  # POSIX; the lock is what keeps concurrent first calls to one conversion

    with open(path, "a+") as handle:
        start, warned = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout:
                    raise PretrainedError(f"waited {timeout:.0f} s for the lock {path}; is a download stuck?") from None
                if not warned:
                    logging.info("another process is downloading/converting into %s; waiting", path.parent)
                    warned = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fetch(
    name: str = "vgg16",
    source: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    lock_timeout: float = 3600.0,
) -> pathlib.Path:
    """The cached run directory of published weights `name`, downloading and converting them if absent.

    See the module docstring for the sources, checks and environment variables.
    """
    entry = lookup(name, source)
    root = cache_root(cache_dir)
    key = entry.key + (f"-sha256-{sha256.strip().lower()[:16]}" if sha256 else "")
    run_dir = root / key
    if (run_dir / MARKER).is_file():  # complete by construction (renamed into place); no network needed
        return run_dir
    algorithm, digest = _expected_hash(entry, sha256)  # before any download or lock: refuse unverifiable files
    if entry.filename.endswith(".pth") and importlib.util.find_spec("torch") is None:  # before 500 MB arrive
        raise PretrainedError(
            f"{entry.source}/{entry.name} is a PyTorch .pth file and reading it needs torch (`pip install torch`); "
            f"source='timm' has the same weights as safetensors, read without torch (pass its sha256=)"
        )
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{key}.lock", lock_timeout):
        if (run_dir / MARKER).is_file():  # another process finished while we waited
            return run_dir
        source_url = resolve_url(entry, url)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            weights = work / entry.filename
            logging.info("downloading %s/%s from %s", entry.source, entry.name, source_url)
            file_sha256 = download(source_url, weights, algorithm, digest)
            from vgg_jax.weights import convert

            staged = work / "run"
            config = convert.convert(entry.source, weights, entry.variant, staged)
            if bool(config.model.include_top) != entry.include_top:
                raise PretrainedError(
                    f"{source_url} {'lacks' if entry.include_top else 'has'} the classifier layers, unlike the "
                    f"published {entry.filename}; nothing was cached"
                )
            record = dict(
                source=entry.source,
                name=entry.name,
                variant=entry.variant,
                url=source_url,
                published_url=entry.url,
                checked=dict(algorithm=algorithm, expected=digest),
                sha256=file_sha256,
                converted=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
            (staged / MARKER).write_text(json.dumps(record, indent=2))
            if run_dir.exists():  # a leftover without a marker (cannot come from this code); replace it
                shutil.rmtree(run_dir)
            os.replace(staged, run_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return run_dir


def pretrained(
    name: str = "vgg16",
    source: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    batch_size: int = 64,
    dtype: Any = None,
) -> Any:
    """A `vgg_jax.inference.Classifier` with published weights (what `vgg_jax.load` returns).

    `name`: 'vgg11', 'vgg13', 'vgg16', 'vgg19', 'vgg16_notop', 'vgg19_notop'
    (or 'source/name'); `source`: 'keras', 'torchvision' or 'timm' (None: Keras
    for VGG16/19, the authors' weights; torchvision for VGG11/13). Downloaded,
    hash-checked and converted on the first call, then loaded from the cache.
    Notop weights have no classifier: `features` works, `predict` raises.
    """
    from vgg_jax import inference

    run_dir = fetch(name, source, cache_dir=cache_dir, url=url, sha256=sha256)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return inference.load(str(run_dir), batch_size=batch_size, **kwargs)


class _CallableModule(types.ModuleType):
    """Lets ``vgg_jax.pretrained("vgg16")`` work even after ``import vgg_jax.pretrained`` rebinds the name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return pretrained(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
