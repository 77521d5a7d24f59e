"""``lrpq`` command line: argument parsing and printing only; the work happens in the library.

One module per command (``quantize_command``, ``eval_command``, ``relevance_command``, ``prune_command``;
``bench`` keeps its own arguments); this module assembles them and turns errors and signals into exit statuses.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from lrpq import bench
from lrpq.cli.eval_command import add_eval_parser
from lrpq.cli.prune_command import add_prune_parser
from lrpq.cli.quantize_command import add_quantize_parser
from lrpq.cli.relevance_command import add_relevance_parser
from lrpq.errors import LrpqError

EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's convention


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrpq", description="Mixed-precision PTQ for vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_quantize_parser(commands)
    add_eval_parser(commands)
    add_relevance_parser(commands)
    add_prune_parser(commands)
    b = commands.add_parser("bench", help="calibration, relevance, inference, memory and size as ratios to float")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run_from_args)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt (and like it no ``Exception``), so clean-up code runs."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while a command runs, unless SIGTERM already has a handler or is ignored.

    Without this, SIGTERM kills the process at once and leaves its staging folder behind.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error is one line and status 2.

    Ctrl-C and SIGTERM are one line too, with the statuses a shell gives a process they end (130, 143), once
    the command has removed what it had begun to write.
    """
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_raises():
            return args.func(args)
    except LrpqError as error:
        print(f"lrpq {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrpq {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"lrpq {args.command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
