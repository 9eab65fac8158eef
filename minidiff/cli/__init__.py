"""The ``minidiff`` command: one module per family of subcommands, each parser next to its handler.

    toy.py       demo, train, sample, evaluate               (toy diffusion models)
    dalle.py     train-vqvae, evaluate-vqvae, train-dalle, dalle, evaluate-dalle
    sd.py        txt2img, convert, train-mini-sd, evaluate-mini-sd
    finetune.py  draw-subject, textual-inversion, dreambooth, evaluate-finetune

Defaults come from the config dataclasses (:mod:`minidiff.train.configs`); checking values is the
library's job, whose ``ValueError`` is printed as one line.  Nothing here imports JAX until a
command runs.
"""

from __future__ import annotations

import argparse
import sys

from . import dalle, finetune, sd, toy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff", description="Image generation from scratch.")
    sub = p.add_subparsers(dest="command", required=True)
    for family in (toy, dalle, sd, finetune):
        family.add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"minidiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a trainer has written its checkpoint first
        print(f"minidiff {args.command}: interrupted (a training run continues from its checkpoint with --resume, "
              "or, for the mini SD and fine-tuning, when the command is run again)", file=sys.stderr)
        return 130
    return 0
