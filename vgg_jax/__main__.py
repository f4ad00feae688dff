"""``vgg-jax COMMAND --flag=value …`` (or ``python -m vgg_jax COMMAND …``): one entry point for every command.

Each command is also ``python -m <its module>``; ``vgg-jax COMMAND --help`` lists its flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name → (module with a run() that reads sys.argv, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vgg_jax.main", "train a net (paper §3.1), e.g. --config=configs/a.py:demo --workdir=runs/demo"),
    "evaluate": (
        "vgg_jax.evaluation.evaluate",
        "test runs (§3.2): dense / multi-crop, scales, flips, fusion; top-1/top-5",
    ),
    "transfer": ("vgg_jax.evaluation.transfer", "App. B: a run's features + a linear SVM on another data set"),
    "localise": ("vgg_jax.localisation.evaluate", "App. A: localisation protocols 1 and 2 (Tables 8, 9)"),
    "convert": ("vgg_jax.weights.convert", "published weights (Keras, torchvision, timm) into a run directory"),
    "mean-rgb": ("vgg_jax.data.mean_rgb", "a data set's mean RGB (§3.1 preprocessing)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: vgg-jax COMMAND --flag=value …  (vgg-jax COMMAND --help lists the flags)\n\ncommands:\n" + "\n".join(
        lines
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command `argv[0]` names with the rest of `argv` as its flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: {name!r} is not a vgg-jax command; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"vgg-jax {name}", *rest]
    module.run()


if __name__ == "__main__":
    main()
