"""What every command does with input it cannot use: one line naming the argument and what is accepted.

A failure to read the config, the flags or a command's arguments ends the
command with ``error: --name=value: <what is wrong>; expected <what is
accepted>`` on stderr and exit status 2 (`USAGE_STATUS`), before any
expensive work. A failure of the work itself that the user can act on (a
missing run, a damaged checkpoint, a workdir in use, a full disk) ends with
one ``error:`` line and status 1 (`FAILURE_STATUS`). Neither prints a
traceback unless asked: ``--verbosity=1`` (absl's flag; the argparse commands
accept it too) or ``VGG_JAX_VERBOSE=1``. Bugs (any other exception) keep
their traceback.

Commands built on absl flags call `run_absl`; those built on argparse use
`ArgumentParser` and `run`. A value parsed by the command itself goes through
`argument` (e.g. ``cli.argument("--step", checkpoints.parse_step, text)``),
so its error names the argument too.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from vgg_jax import console

USAGE_STATUS = 2
FAILURE_STATUS = 1
T = TypeVar("T")


class ArgumentError(ValueError):
    """A command-line value (flag, argument, config field) that cannot be used; the message names it."""


def argument(name: str, parse: Callable[[Any], T], value: Any) -> T:
    """`parse(value)`, its ValueError/TypeError turned into an `ArgumentError` naming ``name=value``."""
    try:
        return parse(value)
    except (ValueError, TypeError) as error:
        raise ArgumentError(f"{name}={value}: {error}") from error


def integers(text: str) -> list[int]:
    """'256,384,512' → [256, 384, 512]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError("expected comma-separated whole numbers, e.g. 256,384,512") from None


def numbers(text: str) -> list[float]:
    """'0.1,1,10' → [0.1, 1.0, 10.0]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError("expected comma-separated numbers, e.g. 0.1,1,10") from None


def verbose_requested(argv: Sequence[str]) -> bool:
    """``--verbosity=N`` / ``-v N`` with N > 0 among the arguments, or VGG_JAX_VERBOSE=1."""
    for index, arg in enumerate(argv):
        value = None
        if arg.startswith(("--verbosity=", "-v=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--verbosity", "-v") and index + 1 < len(argv):
            value = argv[index + 1]
        if value is not None and value.strip().lstrip("-").isdigit() and int(value) > 0:
            return True
    return console.verbose_requested()


def fail(error: BaseException, *, verbose: bool, status: int) -> NoReturn:
    """Prints ``error: …`` (after the traceback when `verbose`) and exits with `status`."""
    sys.stdout.flush()
    if verbose:
        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(status)


def run(
    body: Callable[[], T], *, argv: Sequence[str] | None = None, expected: tuple[type[BaseException], ...] = ()
) -> T:
    """`body()`'s result; an `ArgumentError` or one of the `expected` failures exits with one line."""
    verbose = verbose_requested(sys.argv[1:] if argv is None else argv)
    try:
        return body()
    except ArgumentError as error:
        fail(error, verbose=verbose, status=USAGE_STATUS)
    except expected as error:
        fail(error, verbose=verbose, status=FAILURE_STATUS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `ArgumentError` line, with the shared ``--verbosity`` flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--verbosity", type=int, default=0, help="1: show the traceback of an error")

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message} (`{self.prog} --help` lists the arguments)")


def run_absl(
    main: Callable[[list[str]], Any],
    *,
    argv: Sequence[str] | None = None,
    check: Callable[[list[str]], None] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> None:
    """`absl.app.run(main)` with one-line errors for flags (`describe_flag_error`) and for `expected` failures.

    `check(argv)` runs before absl parses the flags (e.g. to load the config file and name what is wrong).
    """
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)
    verbose = verbose_requested(argv[1:])

    def parse(args: list[str]) -> list[str]:
        try:
            if check is not None:
                check(args)
            return flags.FLAGS(args)
        except ArgumentError as error:
            fail(error, verbose=verbose, status=USAGE_STATUS)
        except flags.Error as error:
            fail(ArgumentError(describe_flag_error(error)), verbose=verbose, status=USAGE_STATUS)

    def body(args: list[str]) -> Any:
        if len(args) > 1:
            message = f"unexpected argument(s) {' '.join(args[1:])}: every argument is a --flag=value"
            fail(ArgumentError(message + " (--helpfull lists them)"), verbose=verbose, status=USAGE_STATUS)
        return run(lambda: main(args), argv=argv[1:], expected=expected)

    app.run(body, argv=argv, flags_parser=parse)


def describe_flag_error(error: Exception) -> str:
    """absl's flag error as ``--name=value: …; expected <what the flag accepts>`` (no Python parser jargon)."""
    from absl import flags

    text = str(error)
    if isinstance(error, flags.UnrecognizedFlagError):
        return f"--{error.flagname}: no such flag{text.partition(error.flagname + chr(39))[2]} (--helpfull lists them)"
    match = re.match(r"flag --([\w.-]+)=(.*?): (.*)$", text, re.S)
    if not match or match.group(1) not in flags.FLAGS:
        return text
    name, value, reason = match.groups()
    flag = flags.FLAGS[name]
    if "must have a value other than None" in reason or "must be specified" in reason:
        return f"--{name} is required: {flag.help}"
    accepted = _accepted(flag)
    return f"--{name}={value}: expected {accepted}" if accepted else f"--{name}={value}: {reason}"


def _accepted(flag: Any) -> str:
    parser = flag.parser
    if getattr(parser, "enum_values", None):
        return "one of " + ", ".join(parser.enum_values)
    if flag.flag_type() == "bool":
        return "true or false"
    help_text = getattr(parser, "syntactic_help", "")
    return help_text if help_text and not help_text.startswith("<") else ""
