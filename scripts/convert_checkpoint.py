"""Convert a checkpoint between .pt (torch.save, the reference's files) and .safetensors, either way.

    python scripts/convert_checkpoint.py ema_0.9999_050000.pt ema_0.9999_050000.safetensors
    python scripts/convert_checkpoint.py model.safetensors model.pt

The format of each file follows its extension. The tensors are copied bit for bit; a .safetensors file
holds only {name: tensor}, so optimizer and training-state files stay .pt.
"""

import os

from cm.checkpoint_io import convert_checkpoint, is_safetensors
from cm.script_util import OneLineArgumentParser, run_or_exit


def create_argparser():
    """Two positional paths."""
    parser = OneLineArgumentParser(description="Convert a checkpoint between .pt and .safetensors.")
    parser.add_argument("src", help="checkpoint to read (.pt or .safetensors, by extension)")
    parser.add_argument("dst", help="checkpoint to write (.pt or .safetensors, by extension; written atomically)")
    return parser


def run(args):
    """Convert src to dst; returns the number of tensors written."""
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise ValueError("src and dst are the same file")
    if is_safetensors(args.src) == is_safetensors(args.dst):
        print(f"note: {args.src} and {args.dst} have the same format; copying")
    count = convert_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst} ({count} entries)")
    return count


def main(argv=None):
    """Parse the two paths; bad input stops with one 'error:' line."""
    return run_or_exit(run, create_argparser().parse_args(argv))


if __name__ == "__main__":
    main()
