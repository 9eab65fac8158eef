"""The ``minidiff`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from . import demo

    demo.run(args.out, image=args.image, quick=args.quick, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff", description="Image generation from scratch.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="noise a photo with the forward process; sample 2-D toy data with DDPM and DDIM")
    d.add_argument("-o", "--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    d.add_argument("--image", help="an image file to noise (default: scikit-image's 'chelsea' photograph)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="fewer samples and steps (seconds)")
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"minidiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
