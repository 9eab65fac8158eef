"""Convert a Stable Diffusion 1.x / 2.x checkpoint into minidiff's format.

    python weights_convert.py SRC DST.safetensors [--config sd1|sd2] [--prediction epsilon|v]
                              [--dtype float32|float16|bfloat16] [--no-ema] [--overwrite]

SRC: a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), or one file in the
original (ldm) layout: .safetensors, or .ckpt (read with torch.load(weights_only=True) only).
Writes DST (the Flax parameters, flattened: unet/..., vae/..., text_encoder/...) and DST with
.json (model configs, prediction type, schedule, source, EMA use); prints what was found, used
and skipped.  Load the result with ``minidiff.convert.load_converted(DST)``.  The same command is
``minidiff convert``.
"""


from minidiff.cli import Parser, finish, run
from minidiff.cli.sd import add_convert_arguments, convert


def main(argv=None) -> int:
    parser = Parser(prog="weights_convert.py", description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    return run(convert, parser.parse_args(argv), "weights_convert.py")


if __name__ == "__main__":
    finish(main())
