"""What the four command lines (compress, decompress, evaluate, convert) share.

The promise of every CLI (docs/robustness.md): bad input, a file that cannot be written, or
SIGINT/SIGTERM give one line on stderr and an exit code (2 for bad input, 128+signal for a
signal), and leave nothing behind; no input is ever overwritten.

  OneLineParser, ranged, POSITIVE_INT, HelpFormatter, parse   argparse with one-line errors
  check_paths                                                 outputs never alias inputs or each other
  run_cli                                                     the error / signal / broken-pipe contract
"""
import argparse
import os
import signal
import sys
import threading

import numpy as np

from .backend import BackendError
from .checkpoint import InputError, error_line
from .outputs import remove_leftovers

SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ----------------------------------------------------------------------------- flags
class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a single line (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def ranged(lo, hi, lo_open=False, hi_open=False, kind=float):
    """argparse type: a number in the interval [lo, hi] with optional open ends."""
    def parse_number(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not np.isfinite(x) or x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"{text} is outside {lb}{lo}, {hi}{rb}")
        return x
    return parse_number


POSITIVE_INT = ranged(1, 10**12, kind=int)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append '(default: X)' only where the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text \
                or isinstance(action, argparse._StoreFalseAction):
            return text
        return super()._get_help_string(action)


def parse(parser, argv):
    """Parsed flags, or the exit code argparse chose (2 for usage errors, 0 for --help)."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as e:
        return None, e.code


# ----------------------------------------------------------------------------- paths
def _identity(path):
    """(resolved real path, (device, inode) or None when nothing is there yet)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
        return real, (st.st_dev, st.st_ino)
    except OSError:
        return real, None


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


def check_paths(inputs, outputs):
    """Refuse, before any work, an output that could destroy an input or another output.

    ``inputs`` and ``outputs`` are [(flag, path or None)]; an input that is a folder (--calib,
    an image folder) covers every file under it. Paths are compared after resolving symlinks
    (of the file and of every folder above it) and by (device, inode), which catches hard links.
    Also refused: an output that is a folder or whose folder does not exist.
    """
    inputs = [(flag, os.fspath(p)) for flag, p in inputs if p]
    outputs = [(flag, os.fspath(p)) for flag, p in outputs if p]
    for flag, path in outputs:
        if os.path.isdir(path):
            raise InputError(f"{flag} {path}: is a folder, expected a file name")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"{flag} {path}: no such folder")
    seen = []
    for flag, path in outputs:
        real, ident = _identity(path)
        for in_flag, in_path in inputs:
            in_real, in_ident = _identity(in_path)
            if real == in_real or (ident is not None and ident == in_ident):
                raise InputError(f"{flag} {path} is the same file as {in_flag} {in_path}; "
                                 "refusing to overwrite an input")
            if os.path.isdir(in_real) and _inside(real, in_real):
                raise InputError(f"{flag} {path} lies inside the {in_flag} folder {in_path}; "
                                 "write outputs elsewhere")
        for other_flag, other_path, other_real, other_ident in seen:
            if real == other_real or (ident is not None and ident == other_ident):
                raise InputError(f"{flag} {path} is the same file as {other_flag} {other_path}")
        seen.append((flag, path, real, ident))


# ----------------------------------------------------------------------------- run
class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    _ignore_signals()                    # the cleanup that follows must not be cut short
    raise Interrupted(signum)


def _ignore_signals():
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _say(line):
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):        # stderr closed too: the exit code still tells
        pass


def _silence_stdout():
    """After EPIPE on stdout, point it at /dev/null so Python's exit flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # stdout is not a real file (tests)
        pass


def _failure(e):
    """Exit code of an abnormal end, after the line that says why; unexpected errors re-raise."""
    remove_leftovers()
    if isinstance(e, (Interrupted, KeyboardInterrupt)):
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        _say(f"error: interrupted by {signal.Signals(signum).name}; partial outputs removed")
        return 128 + signum
    if isinstance(e, BrokenPipeError):   # `| head` closed our output: end quietly, like SIGPIPE
        _silence_stdout()
        return 128 + getattr(signal, "SIGPIPE", 13)
    if isinstance(e, (InputError, BackendError, OSError)):
        _say(error_line(e))
        return 2
    raise e                              # a bug: the traceback is the useful report


def run_cli(body):
    """Run ``body()`` (the CLI's work, returning its exit code) under the shared contract:
    SIGINT/SIGTERM -> 128+signal, InputError/BackendError/OSError -> 2, a closed stdout -> 141,
    each with at most one stderr line, and every registered temporary removed."""
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _on_signal) for s in SIGNALS} if main_thread else {}
    try:
        try:
            code = body()
            sys.stdout.flush()           # a closed pipe surfaces here, not at interpreter exit
            return code
        except BaseException as e:       # noqa: B036 -- every way out is mapped in _failure
            if main_thread:
                _ignore_signals()
            return _failure(e)
    except Interrupted as e:             # a signal during the handling of another failure
        return _failure(e)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
