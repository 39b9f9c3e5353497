"""Export an ADM consistency-model checkpoint as a diffusers ConsistencyModelPipeline folder.

    python scripts/export_diffusers.py --model_path ema_0.9999_050000.pt --output_dir cd_lsun_diffusers \\
        [model flags, or --config FILE.yaml] [--steps 40]

The folder holds unet/ (UNet2DModel config and safetensors weights) and scheduler/
(CMStochasticIterativeScheduler on the --steps-point Karras grid between sigma_min and sigma_max), so

    ConsistencyModelPipeline.from_pretrained("cd_lsun_diffusers")(num_inference_steps=1)

gives the images of image_sample.py --sampler onestep for the same noise. Needs pip install -e ".[diffusers]".
The reverse is scripts/import_diffusers.py.
"""

from cm.diffusers_interop import create_adm_model, export_diffusers, import_diffusers, scheduler_config
from cm.script_util import (
    TRAINING_MODES,
    OneLineArgumentParser,
    add_dict_to_argparser,
    load_model_checkpoint,
    model_and_diffusion_defaults,
    run_script,
)


def export_defaults():
    """Flags of the export besides the model flags."""
    return dict(
        model_path="",
        output_dir="",
        training_mode="consistency_distillation",
        steps=40,
        clip_denoised=True,
        dry_run=False,
    )


EXPORT_FLAG_HELP = dict(
    model_path="ADM checkpoint to export (.pt or .safetensors; ours or a released one)",
    output_dir="diffusers folder to write (created; files in it are overwritten)",
    training_mode="how the checkpoint was trained; diffusers' consistency pipeline needs a consistency_* model",
    steps="size N of the Karras grid the scheduler samples on (image_sample.py --steps; multistep --ts index it)",
    clip_denoised="clamp the denoised estimate to [-1, 1] in the scheduler (image_sample.py --clip_denoised)",
    dry_run="print the resolved configuration as JSON and exit",
)


def create_argparser():
    """Export flags plus every model flag of model_and_diffusion_defaults."""
    parser = OneLineArgumentParser(description="Export an ADM checkpoint as a diffusers pipeline folder.")
    add_dict_to_argparser(parser, export_defaults(), EXPORT_FLAG_HELP, dict(training_mode=TRAINING_MODES))
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return parser


def run(args):
    """Build the model from its flags, load the checkpoint, write the pipeline folder; returns its path."""
    if not args.model_path or not args.output_dir:
        raise ValueError("pass --model_path (the checkpoint) and --output_dir (the diffusers folder to write)")
    if "consistency" not in args.training_mode:
        raise ValueError(
            f"diffusers' ConsistencyModelPipeline applies the consistency boundary scalings; a {args.training_mode} "
            "model does not use them, so its pipeline would give wrong images"
        )
    if args.model_type != "adm":
        raise ValueError(f"only the ADM UNet exports to diffusers' UNet2DModel, not model_type {args.model_type}")
    try:
        import_diffusers()  # fail before the checkpoint is read
    except ImportError as e:
        raise RuntimeError(str(e)) from None
    flags = dict(vars(args), use_fp16=False)
    model = load_model_checkpoint(create_adm_model(flags), args.model_path)
    export_diffusers(
        model.eval(),
        args.output_dir,
        scheduler_config(args.steps, args.sigma_min, args.sigma_max, clip_denoised=args.clip_denoised),
    )
    print(f"wrote {args.output_dir}: ConsistencyModelPipeline.from_pretrained({args.output_dir!r})")
    return args.output_dir


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv)


if __name__ == "__main__":
    main()
