"""Read a diffusers UNet2DModel (or ConsistencyModelPipeline) folder into an ADM checkpoint of this library.

    python scripts/import_diffusers.py --diffusers_dir cd_lsun_diffusers --output model.safetensors
    python scripts/image_sample.py --config model.yaml --model_path model.safetensors --sampler onestep

Writes the UNetModel state dict (.pt or .safetensors by extension) and, next to it (--flags_out, default the
output's name with .yaml), the model flags for image_sample.py --config: network shape, and for a
consistency pipeline its grid (steps, sigma_min, sigma_max) and training_mode. Needs no diffusers install.
"""

import os

import yaml

from cm.checkpoint_io import save_checkpoint, write_atomic
from cm.diffusers_interop import import_diffusers_folder
from cm.script_util import (
    OneLineArgumentParser,
    add_dict_to_argparser,
    model_and_diffusion_defaults,
    run_script,
)

SAMPLING_FLAGS = ("training_mode", "steps")


def import_defaults():
    """Flags of the import."""
    return dict(diffusers_dir="", output="", flags_out="", dry_run=False)


IMPORT_FLAG_HELP = dict(
    diffusers_dir="a ConsistencyModelPipeline folder (with unet/ and scheduler/) or a UNet2DModel folder",
    output="checkpoint file to write: .safetensors or .pt",
    flags_out="YAML file of the model flags for --config (default: --output with the extension .yaml)",
    dry_run="print the resolved configuration as JSON and exit",
)


def create_argparser():
    """The import's flags."""
    parser = OneLineArgumentParser(description="Import a diffusers UNet folder as an ADM checkpoint.")
    add_dict_to_argparser(parser, import_defaults(), IMPORT_FLAG_HELP, {})
    return parser


def flags_for_config(flags):
    """The flags image_sample.py takes (model flags plus training_mode and steps), in a fixed order."""
    if flags.get("in_channels", 3) != 3:
        raise ValueError(f"the UNet has {flags['in_channels']} input channels; the cm scripts make RGB images (3)")
    names = list(model_and_diffusion_defaults()) + list(SAMPLING_FLAGS)
    return {k: flags[k] for k in names if k in flags}


def run(args):
    """Convert the folder, write the checkpoint and the flags file; returns (checkpoint path, flags path)."""
    if not args.diffusers_dir or not args.output:
        raise ValueError("pass --diffusers_dir (the diffusers folder) and --output (model.safetensors or model.pt)")
    flags, model = import_diffusers_folder(args.diffusers_dir)
    config = flags_for_config(flags)
    flags_out = args.flags_out or os.path.splitext(args.output)[0] + ".yaml"
    save_checkpoint(model.state_dict(), args.output)
    write_atomic(yaml.safe_dump(config, sort_keys=False), flags_out)
    print(f"wrote {args.output} and {flags_out}: image_sample.py --config {flags_out} --model_path {args.output}")
    return args.output, flags_out


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv)


if __name__ == "__main__":
    main()
