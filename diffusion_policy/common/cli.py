"""What every script's command line shares: one-line refusals of bad input before any work.

- `Parser`: an ArgumentParser whose errors are one line (`error: argument --num_eps: must be at
  least 1, got 0 (see --help)`, exit status 2) and whose --help shows each flag's default.
- value types for flags: `count(minimum)`, `positive`, `nonnegative`, `fraction`;
- `add_run_flags`: --seed, --device, --wandb (progress bars show when stderr is a terminal); `run_cli`: a UserError is one line, exit 2.
- `check_writable(path)`: an output file or run directory that cannot be written (a file in
  the way, a read-only or forbidden location) is refused at start, not after an hour of work;
  nothing is created by the check.
"""

import argparse
import os
import sys
import tempfile

from diffusion_policy.common.atomic import MACHINE_ERRNOS, what_to_do
from diffusion_policy.common.runtime import UserError, resolve_device


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; each flag's help ends with its default unless it already says one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults in --help."""

    def __init__(self, description=None, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def count(minimum=1):
    """An integer flag of at least `minimum`."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive(text):
    """A float flag > 0 (learning rates, scales)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def nonnegative(text):
    """A float flag >= 0 (weights, clips where 0 means off)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def fraction(text):
    """A float flag in [0, 1] (discounts, decays)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def check_writable(path, flag, directory=False):
    """Refuse, before any work, an output `path` (a file, or a directory if `directory`) that
    cannot be written. `flag` names the option in the message. Creates nothing."""
    target = os.path.abspath(path)
    if os.path.exists(target):
        if directory and not os.path.isdir(target):
            raise UserError(f"{flag} {path} is a file, but a directory is needed there: move it or choose "
                            f"another {flag}")
        if not directory and os.path.isdir(target):
            raise UserError(f"{flag} {path} is a directory, but a file is needed there: choose another {flag}")
    parent = target if directory and os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {flag} {path}: the file {parent} is in the way; move it or choose "
                        f"another {flag}")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {parent} is not writable ({e.strerror}); choose "
                        f"another {flag}") from None


def preflight(device="auto", files=None, dirs=None, inputs=None):
    """The checks every script makes before loading anything: the device exists, every output
    file ({flag: path}) and directory ({flag: path}) can be written, no output is one of the
    `inputs` ({flag: path}, compared by real path: links and ./ spellings too), and no two
    outputs are the same file."""
    resolve_device(device)
    outputs = {flag: path for flag, path in (files or {}).items() if path}
    for out_flag, out_path in outputs.items():
        for in_flag, in_path in (inputs or {}).items():
            if in_path and os.path.realpath(out_path) == os.path.realpath(in_path):
                raise UserError(f"{out_flag} {out_path} is {in_flag} itself: writing it would destroy the input; "
                                f"choose another {out_flag}")
    seen = {}
    for out_flag, out_path in outputs.items():
        real = os.path.realpath(out_path)
        if real in seen:
            raise UserError(f"{out_flag} {out_path} and {seen[real]} would be the same file; choose another {out_flag}")
        seen[real] = out_flag
    for flag, path in (files or {}).items():
        if path:
            check_writable(path, flag)
    for flag, path in (dirs or {}).items():
        if path:
            check_writable(path, flag, directory=True)


def add_run_flags(parser, seed_help="random seed"):
    """The flags every stage script shares: --seed, --device, --wandb. Progress bars need no flag:
    they show when stderr is a terminal (`show_progress`), never in logs or pipes."""
    parser.add_argument("--seed", type=count(0), default=0, help=seed_help)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--wandb", default="off", choices=["off", "online", "offline"],
                        help="log to Weights & Biases (project: $WANDB_PROJECT, else pusht-adjoint-matching)")


def add_force_flag(parser):
    """--force: the stages' way to start over in a run directory that holds an earlier run."""
    parser.add_argument("--force", action="store_true",
                        help="start over in a --run_dir that holds an earlier run, discarding its state "
                             "(without it such a directory is refused; --resume continues it)")


def show_progress():
    """Progress bars on a terminal only: a log file or a pipe gets none."""
    return sys.stderr.isatty()


def run_cli(main, parse_args, resume="--resume"):
    """Run a script's main; a UserError prints its message alone and exits with status 2, and Ctrl-C
    prints one line with the command that continues (`resume`: the flag that does, "" when rerunning
    the same command continues, None when nothing continues) and exits with status 130."""
    try:
        return main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a fault of the machine met outside the atomic writers (a folder made, a file read)
        if e.errno not in MACHINE_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{MACHINE_ERRNOS[e.errno]} ({e.strerror}); {what_to_do(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        command = " ".join(["python", *sys.argv] + ([resume] if resume and resume not in sys.argv else []))
        print("interrupted: " + (f"continue with: {command}" if resume is not None
                                 else "stopped before its results were written; run it again"), file=sys.stderr)
        sys.exit(130)
