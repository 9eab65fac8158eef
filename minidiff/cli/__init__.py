"""The ``minidiff`` command: one module per family of subcommands, each parser next to its handler.

    toy.py       demo, train, sample, evaluate               (toy diffusion models)
    dalle.py     train-vqvae, evaluate-vqvae, train-dalle, dalle, evaluate-dalle
    sd.py        txt2img, convert, train-mini-sd, evaluate-mini-sd
    finetune.py  draw-subject, textual-inversion, dreambooth, lora, evaluate-finetune

Defaults come from the config dataclasses (:mod:`minidiff.train.configs`); checking values is the
library's job, whose ``ValueError`` is printed as one line.  Nothing here imports JAX until a
command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from . import dalle, finetune, sd, toy


TRAINING = {"train", "train-vqvae", "train-dalle", "train-mini-sd", "textual-inversion", "dreambooth"}


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (the option and the cause), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = Parser(prog="minidiff", description="Image generation from scratch.")
    p.add_argument("--version", action="version", version=f"minidiff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for family in (toy, dalle, sd, finetune):
        family.add(sub)
    for command in sub.choices.values():  # every command compiles: each takes the cache options
        g = command.add_argument_group("compiled programs")
        g.add_argument("--compile-cache", metavar="DIR", help="keep compiled programs in DIR, so that the next run "
                       "with the same shapes skips compiling (default: $MINIDIFF_CACHE_DIR or ~/.cache/minidiff/jax)")
        g.add_argument("--no-compile-cache", action="store_true", help="compile every program afresh")
    return p


def use_compile_cache(args) -> None:
    """Point JAX's persistent compilation cache where the options say (before JAX is imported)."""
    from .. import compile_cache

    if getattr(args, "no_compile_cache", False):
        compile_cache.disable()
    else:
        try:
            compile_cache.enable(getattr(args, "compile_cache", None))
        except OSError as e:  # an unwritable folder costs speed, not the run
            warnings.warn(f"compiled programs will not be kept: {e}")


def run(func, args, prog: str) -> int:
    """Run a command's handler: a library error is one line and status 2, Ctrl-C or SIGTERM one line
    and 130 (files are written atomically; a trainer has saved its checkpoint first)."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminate)  # so that clean-up code runs on `kill` too
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    show = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"  # one line each
    try:
        use_compile_cache(args)
        func(args)
    except (ValueError, ImportError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (" (a run continues from its last checkpoint: the same command with --resume, or for the mini "
                "SD and fine-tuning the same command again)" if getattr(args, "command", None) in TRAINING
                else " (nothing half-written is left)")
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = show
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a mistake (printed as one line), --help or --version
        return e.code if isinstance(e.code, int) else 2
    return run(args.func, args, f"minidiff {args.command}")


def entry(argv=None):
    """The ``minidiff`` program: ``main``, then :func:`finish`."""
    finish(main(argv))


def finish(rc: int):
    """Exit with ``rc``.  After Ctrl-C the process ends at once (``os._exit``; every file is already
    complete on disk): the XLA runtime can crash while the interpreter tears down objects that an
    interrupt left half-built."""
    import os

    if rc == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
