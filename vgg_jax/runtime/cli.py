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

Every command defines absl flags when it runs (`define_flags`: once per
process, so `vgg-jax` imports only the command it runs) and runs through
`run_absl`; ``--help`` lists each flag with its meaning. A value parsed by the
command itself goes through `argument` (e.g. ``cli.argument("--step",
checkpoints.parse_step, text)``), so its error names the argument too.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from vgg_jax.runtime import console

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


_DEFINED: dict[Callable[[], None], list[str]] = {}


def define_flags(define: Callable[[], None]) -> list[str]:
    """Runs `define()` (a command's absl flag definitions) unless its flags exist in this process; their names."""
    from absl import flags

    names = _DEFINED.get(define)
    if names and all(name in flags.FLAGS for name in names):
        return names
    before = set(flags.FLAGS)
    try:
        define()
    except flags.DuplicateFlagError:  # another command ran in this process (tests): its flags make way
        for name in {*(n for names in _DEFINED.values() for n in names), *(set(flags.FLAGS) - before)}:
            if name in flags.FLAGS:
                delattr(flags.FLAGS, name)
        _DEFINED.clear()
        before = set(flags.FLAGS)
        define()
    _DEFINED[define] = [name for name in flags.FLAGS if name not in before]
    return _DEFINED[define]


def command_help(usage: str, names: Sequence[str], required: Sequence[str] = ()) -> str:
    """`usage` and one line per flag: ``--name (required | default …): meaning``."""
    from absl import flags

    lines = [usage, "", "flags:"]
    for name in names:
        flag = flags.FLAGS[name]
        default = "required" if name in required else f"default {flag.default_as_str}"
        lines.append(f"  --{name} ({default}): {flag.help}")
    lines.append("  --verbosity (default 0): 1 shows library logs and the traceback of an error")
    return "\n".join(lines)


def run_absl(
    main: Callable[[list[str]], Any],
    *,
    define: Callable[[], None],
    usage: str,
    required: Sequence[str] = (),
    argv: Sequence[str] | None = None,
    check: Callable[[list[str]], None] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> None:
    """Defines the command's flags and runs `main` under absl with one-line errors (`describe_flag_error`).

    ``--help`` prints `usage` and the command's flags. `required` flags must be given. `check(argv)` runs
    before absl parses the flags (e.g. to load the config file and name what is wrong); an `expected`
    failure of `main` is one ``error:`` line with status 1.
    """
    from absl import app, flags

    names = define_flags(define)
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("--help", "-h", "--helpshort") for arg in argv[1:]):
        print(command_help(usage, names, required))
        sys.exit(0)
    verbose = verbose_requested(argv[1:])

    def parse(args: list[str]) -> list[str]:
        try:
            if check is not None:
                check(args)
            for name in names:  # a second run in one process starts from the command's defaults
                flags.FLAGS[name].unparse()
            parsed = flags.FLAGS(args)
            missing = [name for name in required if flags.FLAGS[name].value is None]
            if missing:
                raise ArgumentError(f"--{missing[0]} is required: {flags.FLAGS[missing[0]].help}")
            return parsed
        except ArgumentError as error:
            fail(error, verbose=verbose, status=USAGE_STATUS)
        except flags.Error as error:
            fail(ArgumentError(describe_flag_error(error)), verbose=verbose, status=USAGE_STATUS)

    def body(args: list[str]) -> Any:
        if len(args) > 1:
            message = f"unexpected argument(s) {' '.join(args[1:])}: every argument is a --flag=value"
            fail(ArgumentError(message + " (--help lists them)"), verbose=verbose, status=USAGE_STATUS)
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
