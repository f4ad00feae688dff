"""VGG configuration A (paper Table 1) with the paper's recipe; see common.py for `arg`."""

import pathlib
import sys

import ml_collections

# Config files are loaded by path (--config=configs/a.py): make `configs` importable from anywhere.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return common.get_config("A", arg)
