"""Paper §3.1 training data from a folder of your own photos: ``config.dataset='folder:PATH'``.

Two layouts (JPEG or PNG files of any size; other files are ignored):

    PATH/<split>/<class>/<image>   the splits as named (train, test, …): TFDS's ImageFolder layout
    PATH/<class>/<image>           one split: a seeded `HOLDOUT_FRACTION` of each class becomes 'test'

(also when PATH holds a single split folder). The class names are the sorted class folder names, stored
with the run as for any TFDS set. The folder is prepared once into a TFDS data set under
``config.data_dir`` (its files copied undecoded into TFRecords, a one-off copy of the folder's size), so
the streams read it as they read ImageNet: a shard per process, slices such as 'train[:50%]', exact
resume. A folder whose listing changes (a file added, removed or rewritten) is prepared again, as a new
copy. Undecodable files follow ``config.corrupt_images`` and are named by their path in the folder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import random

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from vgg_jax.runtime import paths
from vgg_jax.runtime.paths import FOLDER_PREFIX as PREFIX

EXTENSIONS = (".jpg", ".jpeg", ".png")
HOLDOUT_FRACTION = 0.2  # [choice] of each class, when the folder has one split
HOLDOUT_SPLIT = "test"
TRAIN_SPLIT = "train"


def is_folder(dataset: str) -> bool:
    """Whether ``config.dataset`` names a folder of images rather than a TFDS set."""
    return isinstance(dataset, str) and dataset.startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a folder holds: {split: [(path relative to the folder, class name)]}, the classes, a fingerprint."""

    root: str
    splits: dict[str, list[tuple[str, str]]]
    classes: tuple[str, ...]
    fingerprint: str


def _visible(directory: str) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(directory) if not e.name.startswith(".")), key=lambda e: e.name)


def _images(directory: str) -> tuple[list[os.DirEntry], int]:
    """The JPEG/PNG files of `directory` (sorted) and how many other files it holds."""
    files = [e for e in _visible(directory) if e.is_file()]
    images = [e for e in files if e.name.lower().endswith(EXTENSIONS)]
    return images, len(files) - len(images)


def _class_dirs(directory: str) -> list[os.DirEntry]:
    return [e for e in _visible(directory) if e.is_dir()]


def scan(root: str) -> Listing:
    """Lists `root` in one of the two layouts; raises with the layout expected when it is neither."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"config.dataset={PREFIX}{root}: no such directory")
    top = _class_dirs(root)
    has_images = [d for d in top if _images(d.path)[0]]
    if has_images and len(has_images) == len(top):  # PATH/<class>/<image>
        layout = {TRAIN_SPLIT: top}
    elif not has_images and top and all(_class_dirs(d.path) for d in top):  # PATH/<split>/<class>/<image>
        layout = {d.name: _class_dirs(d.path) for d in top}
    else:
        raise ValueError(
            f"config.dataset={PREFIX}{root}: expected PATH/<class>/<image> or PATH/<split>/<class>/<image> "
            f"with {'/'.join(EXTENSIONS)} files; found folders {[d.name for d in top]} "
            f"({len(has_images)} of them holding images directly)"
        )
    splits, ignored, stamp = {}, 0, hashlib.sha256()
    for split, class_dirs in layout.items():
        items = []
        for class_dir in class_dirs:
            images, others = _images(class_dir.path)
            ignored += others
            for image in images:
                relative = os.path.relpath(image.path, root)
                items.append((relative, class_dir.name))
                status = image.stat()
                stamp.update(f"{relative}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        splits[split] = items
    if ignored:
        logging.warning("%s: ignoring %d file(s) that are not %s", root, ignored, "/".join(EXTENSIONS))
    if not any(splits.values()):
        raise ValueError(f"config.dataset={PREFIX}{root}: no {'/'.join(EXTENSIONS)} images in its class folders")
    if len(splits) == 1:
        splits = _hold_out(next(iter(splits.values())))
    classes = tuple(sorted({name for items in splits.values() for _, name in items}))
    stamp.update(f"{HOLDOUT_FRACTION}".encode())
    return Listing(root=root, splits=splits, classes=classes, fingerprint=stamp.hexdigest()[:16])


def _hold_out(items: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """'train' and 'test' from one split: round(HOLDOUT_FRACTION · n) of each class's n images (one if n ≥ 2)."""
    train, test = [], []
    for name in sorted({name for _, name in items}):
        members = [item for item in items if item[1] == name]
        random.Random(f"vgg_jax holdout {name}").shuffle(members)  # seeded by the class: stable as files are added
        count = max(round(HOLDOUT_FRACTION * len(members)), 1) if len(members) >= 2 else 0
        test += members[:count]
        train += members[count:]
    return {TRAIN_SPLIT: sorted(train), HOLDOUT_SPLIT: sorted(test)}


class PhotoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `Listing` as a TFDS data set: {'image': the file's bytes, 'label': its class, 'filename': its path}."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)  # as in embedded.py: no importlib_resources lookup

    def __init__(self, listing: Listing, data_dir: str) -> None:
        self.listing = listing
        super().__init__(data_dir=data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"The JPEG/PNG images of {self.listing.root}, labelled by their folder.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(),  # bytes as in the file; decoded by the streams
                    "label": tfds.features.ClassLabel(names=list(self.listing.classes)),
                    "filename": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(items) for split, items in self.listing.splits.items()}

    def _generate_examples(self, items: list[tuple[str, str]]):
        for relative, name in items:
            path = os.path.join(self.listing.root, relative)
            yield relative, {"image": epath.Path(path).read_bytes(), "label": name, "filename": path}


def builder(dataset: str, data_dir: str | None) -> PhotoFolder:
    """The prepared data set of folder `dataset` ('folder:PATH'), under `data_dir` (None: TFDS's default)."""
    listing = scan(paths.resolve(dataset.removeprefix(PREFIX)))
    root = os.fspath(data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"))
    name = os.path.basename(listing.root.rstrip(os.sep)) or "root"
    where = os.path.join(root, "folders", f"{name}-{hashlib.sha256(listing.root.encode()).hexdigest()[:8]}")
    prepared = os.path.join(where, listing.fingerprint)
    os.makedirs(where, exist_ok=True)
    # Several processes on one machine (local multi-host) may start together: one prepares, under a lock.
    with open(os.path.join(where, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            found = PhotoFolder(listing, prepared)
            if not found.is_prepared():
                sizes = ", ".join(f"{split} {len(items)}" for split, items in listing.splits.items())
                logging.info("Preparing %s (%s images) in %s.", listing.root, sizes, prepared)
                found.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
                )
                found = PhotoFolder(listing, prepared)  # re-opened: a builder made before its data sees no splits
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return found
