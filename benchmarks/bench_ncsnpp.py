"""Training-step throughput of NCSN++ at the CIFAR-10 configuration next to an ADM UNet of similar size.

One step = forward + backward of mean(F(c_in x, rescaled_t)^2) at random noise levels, the network work
of an EDM or CT step. Prints each network's FLOPs per image, images/s and achieved FLOP/s, and the
throughput ratio (never asserted in tests). NCSN++ keeps 256 channels at full resolution, so it does
about 2.3x the FLOPs of this ADM UNet per image.

    python benchmarks/bench_ncsnpp.py                      # CPU: batch 8
    python benchmarks/bench_ncsnpp.py --precision bf16     # CUDA when present: batch 128
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from cm.ncsnpp import CIFAR10_CONFIG, NCSNpp
from cm.unet import UNetModel
from timing import interleaved_seconds


# An ADM UNet at 32 px of about the same size: 57.1M parameters
ADM_SIMILAR = dict(
    image_size=32,
    in_channels=3,
    model_channels=128,
    out_channels=3,
    num_res_blocks=3,
    attention_resolutions=(2, 4),
    channel_mult=(1, 2, 2, 2),
    num_head_channels=64,
    use_scale_shift_norm=True,
    resblock_updown=True,
)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parameter_count(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_step(model, x, t):
    """Forward and backward of a squared-output loss; returns nothing, leaves gradients in the model."""
    model.zero_grad(set_to_none=True)
    model(x, t).float().square().mean().backward()


def step_flops_per_image(model, x, t):
    """FLOPs of one forward + backward per image (matmuls and convolutions, torch's flop counter)."""
    with FlopCounterMode(display=False) as counter:
        training_step(model, x[:1], t[:1])
    return counter.get_total_flops()


def noisy_batch(batch, device, channels_last, seed=0):
    """Images and rescaled_t = 250 log sigma with ln sigma ~ N(-1.2, 1.2^2) (EDM's training distribution)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, 1000 * 0.25 * torch.log(sigma + 1e-44)


def interleaved_throughput(models, x, t, steps, warmup):
    """Images/s of each model, timing their steps in turn so that load on a shared machine hits both alike."""
    calls = {name: (lambda r, model=model: training_step(model, x, t)) for name, model in models.items()}
    seconds = interleaved_seconds(calls, steps, x.device, warmup=warmup)
    return {name: x.shape[0] * steps / seconds[name] for name in models}


def prepare(model, device, precision, channels_last):
    """Move to the device, set the memory format and half-precision body, training mode."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if PRECISIONS[precision] is not None:
        model.convert_to_fp16(PRECISIONS[precision])
    return model.train()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="images per step (0: 128 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="network body dtype")
    parser.add_argument("--channels_last", action="store_true", help="NHWC memory format")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 8)
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup or (5 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)

    torch.manual_seed(0)
    models = {
        # consistency_models_cifar10's network, 56.4M parameters
        "NCSN++": prepare(NCSNpp(**CIFAR10_CONFIG), device, args.precision, args.channels_last),
        "ADM UNet": prepare(UNetModel(**ADM_SIMILAR), device, args.precision, args.channels_last),
    }
    x, t = noisy_batch(batch, device, args.channels_last)
    results = interleaved_throughput(models, x, t, steps, warmup)
    for name, model in models.items():
        flops = step_flops_per_image(model, x, t)
        print(
            f"{name:9s} {parameter_count(model) / 1e6:6.2f}M params  {flops / 1e9:6.1f} GFLOP/img (fwd+bwd)  "
            f"{results[name]:8.2f} img/s  {results[name] * flops / 1e9:7.1f} GFLOP/s"
        )
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; batch {batch}, {steps} timed steps, {args.precision}, channels_last={args.channels_last}")
    print(f"NCSN++ / ADM throughput ratio: {results['NCSN++'] / results['ADM UNet']:.2f}")


if __name__ == "__main__":
    main()
