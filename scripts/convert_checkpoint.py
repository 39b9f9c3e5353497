"""Convert a checkpoint between .pt (torch.save, the reference's files) and .safetensors, either way; or a
distributed checkpoint folder (--parallel fsdp) into the reference's single files.

    python scripts/convert_checkpoint.py ema_0.9999_050000.pt ema_0.9999_050000.safetensors
    python scripts/convert_checkpoint.py model.safetensors model.pt
    python scripts/convert_checkpoint.py logs/run/sharded050000 logs/run

The format of each file follows its extension. The tensors are copied bit for bit; a .safetensors file
holds only {name: tensor}, so optimizer and training-state files stay .pt. From a shardedNNNNNN folder (read in
one process, whatever number of ranks wrote it) the destination is a directory that receives modelNNNNNN.pt,
ema_RATE_NNNNNN.pt, the extra networks and optNNNNNN.pt: with the run's stateNNNNNN.pt beside them, a complete
checkpoint that --parallel ddp resumes from.
"""

import os

from cm.checkpoint_io import atomic_save, convert_checkpoint, is_safetensors
from cm.distributed_checkpoint import single_files
from cm.script_util import OneLineArgumentParser, run_or_exit


def create_argparser():
    """Two positional paths."""
    parser = OneLineArgumentParser(description="Convert a checkpoint between .pt and .safetensors.")
    parser.add_argument("src", help="checkpoint to read (.pt or .safetensors, by extension), or a shardedNNNNNN "
                        "folder")
    parser.add_argument("dst", help="checkpoint to write (.pt or .safetensors, by extension; written atomically); "
                        "for a folder src, the directory of the single files")
    parser.add_argument("--format", default="pt", choices=("pt", "safetensors"),
                        help="file format of the networks written from a folder src")
    return parser


def export_folder(src, dst, fmt):
    """The single files of the distributed checkpoint `src`, written into the directory `dst`; returns their names."""
    os.makedirs(dst, exist_ok=True)
    files = single_files(src, fmt)
    for name, obj in files.items():
        atomic_save(obj, os.path.join(dst, name))
        print(f"wrote {os.path.join(dst, name)}")
    return list(files)


def run(args):
    """Convert src to dst; returns the number of tensors written (for a folder src, the names of the files)."""
    if os.path.isdir(args.src):
        return export_folder(args.src, args.dst, args.format)
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
