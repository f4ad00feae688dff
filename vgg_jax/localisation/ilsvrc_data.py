"""Paper App. A data: ILSVRC-2012 localisation from the official archives, as the TFDS set ``ilsvrc2012_loc``.

No download: put these four files into the TFDS manual directory (``<data_dir>/downloads/manual/``)
and train with ``--config=configs/loc.py --config.dataset=ilsvrc2012_loc`` (prepared on first use):

- ``ILSVRC2012_img_train.tar`` (one ``<synset>.tar`` of JPEGs per class) and ``ILSVRC2012_img_val.tar``;
- ``ILSVRC2012_bbox_train_v2.tar.gz`` (``<synset>/<image>.xml``) and ``ILSVRC2012_bbox_val_v3.tgz``
  (``val/<image>.xml``): one Pascal-VOC-style XML per image — ``<size>`` with ``<width>``/``<height>``
  and one ``<object>`` per box with ``<name>`` (the synset) and ``<bndbox>`` (``xmin ymin xmax ymax`` pixels).

Examples (only images that have boxes: about 544K in train, all 50K in validation): ``image`` (JPEG),
``label`` (ImageNet's 1000 synsets, `imagenet2012`'s order), ``objects`` = Sequence({``bbox``,
``label``}) and ``file_name``. Boxes are normalised like TFDS's ``voc`` (pixel / image size, clipped
to [0, 1]). The validation image's class is the class of its boxes (one class per image in ILSVRC).
"""

from __future__ import annotations

import os
import tarfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

TRAIN_IMAGES, VAL_IMAGES = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
TRAIN_BOXES, VAL_BOXES = "ILSVRC2012_bbox_train_v2.tar.gz", "ILSVRC2012_bbox_val_v3.tgz"


def parse_annotation(xml: bytes | str) -> tuple[int, int, list[tuple[str, float, float, float, float]]]:
    """(height, width, [(synset, ymin, xmin, ymax, xmax) normalised and clipped to [0, 1]]) of one XML file."""
    root = ElementTree.fromstring(xml)
    size = root.find("size")
    width, height = float(size.findtext("width")), float(size.findtext("height"))
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        ymin, xmin = float(box.findtext("ymin")) / height, float(box.findtext("xmin")) / width
        ymax, xmax = float(box.findtext("ymax")) / height, float(box.findtext("xmax")) / width
        coords = np.clip([ymin, xmin, ymax, xmax], 0.0, 1.0)
        objects.append((obj.findtext("name").strip(), *(float(v) for v in coords)))
    return int(height), int(width), objects


def read_annotations(archive: str) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """{image stem: its boxes} from a box archive (any folder layout inside)."""
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xml"):
                stem = os.path.basename(member.name)[: -len(".xml")]
                found[stem] = parse_annotation(tar.extractfile(member).read())[2]
    return found


def _label_names_file() -> str:
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    return imagenet_common.label_names_file()


class Ilsvrc2012Loc(tfds.core.GeneratorBasedBuilder):
    """ILSVRC-2012 classification-localisation: the images that have boxes, with their boxes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {TRAIN_IMAGES}, {VAL_IMAGES}, {TRAIN_BOXES} and {VAL_BOXES} (image-net.org, ILSVRC2012) into manual_dir."
    )
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        names = tfds.features.ClassLabel(names_file=_label_names_file())
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": names,
                    "objects": tfds.features.Sequence(
                        {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=names.names)}
                    ),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://image-net.org/challenges/LSVRC/2012/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual = epath.Path(dl_manager.manual_dir)
        return {
            "train": self._generate_examples(manual / TRAIN_IMAGES, manual / TRAIN_BOXES, nested=True),
            "validation": self._generate_examples(manual / VAL_IMAGES, manual / VAL_BOXES, nested=False),
        }

    def _generate_examples(self, images: epath.Path, box_archive: epath.Path, nested: bool):
        annotations = read_annotations(os.fspath(box_archive))
        for name, data in _jpegs(os.fspath(images), nested):
            stem = name[: -len(".JPEG")] if name.endswith(".JPEG") else os.path.splitext(name)[0]
            objects = annotations.get(stem)
            if not objects:
                continue  # the localisation set: images with boxes only
            boxes = [{"bbox": tfds.features.BBox(*coords), "label": synset} for synset, *coords in objects]
            yield stem, {"image": data, "label": objects[0][0], "objects": boxes, "file_name": name}


def _jpegs(archive: str, nested: bool) -> Iterator[tuple[str, bytes]]:
    """(file name, JPEG bytes) of an image archive; `nested`: a tar of per-class tars (the train archive)."""
    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.isfile():
                continue
            if nested:
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    for image in inner:
                        if image.isfile():
                            yield os.path.basename(image.name), inner.extractfile(image).read()
            else:
                yield os.path.basename(member.name), outer.extractfile(member).read()
