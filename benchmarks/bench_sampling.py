"""Images/s of one-step and two-step consistency sampling, as scripts/image_sample.py runs them.

Each timed batch is karras_sample (onestep, or multistep with ts 0,22,39 on the 40-point grid) plus the
uint8 conversion, under torch.inference_mode, for several network settings: fp32 in NCHW, fp32 channels_last
(the script's default), and a half-precision body (bf16 on CPU, --use_bf16; fp16 on CUDA, --use_fp16 as the
reference's launch commands). Settings are timed in turns, so load on a shared machine hits them alike.
Prints one line per setting and sampler; never run by the tests.

    python benchmarks/bench_sampling.py                       # CPU: small 32-px config, batch 16
    python benchmarks/bench_sampling.py --config imagenet64   # CUDA when present: the ImageNet-64 CD model, batch 256
"""

import argparse
import json

import torch

from cm.image_util import to_uint8
from cm.sampling import karras_sample
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from timing import interleaved_seconds

CONFIGS = {
    # the DESIGN benchmark network: 32 px, 64 channels, multipliers 1,2,2, 2 res blocks, attention at 16 and 8
    "small": dict(image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2", attention_resolutions="16,8",
                  num_heads=4),
    # the released ImageNet-64 consistency models (cd_imagenet64_*.pt)
    "imagenet64": dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                       num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True, class_cond=True,
                       weight_schedule="uniform"),
}
SAMPLERS = {"onestep": dict(sampler="onestep"), "2-step": dict(sampler="multistep", ts=(0, 22, 39))}


def build(config, device, channels_last, half):
    """A random-weight consistency model of the named config on `device`, prepared like load_sampling_model."""
    kwargs = model_and_diffusion_defaults()
    kwargs.update(CONFIGS[config])
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**kwargs, distillation=True)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if half is not None:
        model.convert_to_fp16(half)
    return model.eval().requires_grad_(False), diffusion, kwargs


def sample_batch(model, diffusion, kwargs, batch, sampler, seed):
    """One batch as the sampling script makes it: karras_sample, then uint8 NHWC."""
    device = next(model.parameters()).device
    model_kwargs = {"y": torch.arange(batch, device=device) % 1000} if kwargs["class_cond"] else {}
    torch.manual_seed(seed)
    with torch.inference_mode():
        x = karras_sample(diffusion, model, (batch, 3, kwargs["image_size"], kwargs["image_size"]), steps=40,
                          model_kwargs=model_kwargs, device=device, **SAMPLERS[sampler])
        return to_uint8(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="network (default: imagenet64 on CUDA, small on CPU)")
    parser.add_argument("--batch", type=int, default=0, help="images per batch (0: 256 on CUDA, 16 on CPU)")
    parser.add_argument("--repeats", type=int, default=0, help="timed batches per setting (0: 10 on CUDA, 4 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    config = args.config or ("imagenet64" if cuda else "small")
    batch = args.batch or (256 if cuda else 16)
    repeats = args.repeats or (10 if cuda else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    half = torch.float16 if cuda else torch.bfloat16
    settings = {
        "fp32 nchw": build(config, args.device, False, None),
        "fp32 channels_last": build(config, args.device, True, None),
        f"{'fp16' if cuda else 'bf16'} channels_last": build(config, args.device, True, half),
    }
    results = {}
    for sampler in SAMPLERS:
        calls = {name: (lambda r, setting=setting: sample_batch(*setting, batch, sampler, seed=r))
                 for name, setting in settings.items()}
        seconds = interleaved_seconds(calls, repeats, args.device)
        for name in settings:
            results[f"{sampler} {name}"] = batch * repeats / seconds[name]
            print(f"{config} {sampler:8s} {name:22s} {results[f'{sampler} {name}']:9.2f} img/s  (batch {batch}, "
                  f"{args.device}, {torch.get_num_threads()} threads)")
    if args.json:
        print(json.dumps({"config": config, "batch": batch, "device": args.device, "img_per_s": results}))


if __name__ == "__main__":
    main()
