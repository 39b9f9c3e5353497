"""A DiT-B/2 training step on ImageNet-256 latents (32 x 32 x 4) against the ADM ImageNet-64 UNet's, fp32 and bf16.

    python benchmarks/bench_dit.py                          # CPU, batch 2, fp32 and bf16 autocast
    python benchmarks/bench_dit.py --device cuda --batch 32 # a GPU (add --sizes XL/2 for the paper's large model)

A step is the EDM loss of the class-conditional network on random data, its backward and an AdamW update. FLOPs
per step are counted once with torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions, forward
and backward); the median step time gives FLOP/s. On a CPU the counter does not see the fused attention kernel
(about 5% of DiT-B/2's forward at 256 tokens), so CPU FLOP/s are slightly low for DiT. Prints one line per network
and precision; asserts nothing.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_call  # noqa: E402

from cm.karras_diffusion import KarrasDenoiser  # noqa: E402
from cm.script_util import create_model  # noqa: E402

ADM_IMAGENET64 = dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="1,2,3,4",
                      attention_resolutions="32,16,8", num_head_channels=64, resblock_updown=True,
                      use_scale_shift_norm=True)  # the released ImageNet-64 network (296M parameters)


def build(name):
    """(network, input shape) of "adm64" or a DiT size ("B/2") on ImageNet-256 latents; class-conditional."""
    common = dict(class_cond=True, num_classes=1000, null_class=True)
    if name == "adm64":
        return create_model(**ADM_IMAGENET64, **common), (3, 64, 64)
    return create_model(image_size=32, num_channels=0, num_res_blocks=0, model_type="dit", dit_size=name,
                        in_channels=4, **common), (4, 32, 32)


def step_function(model, shape, batch, device, bf16):
    """One EDM training step (loss, backward, AdamW update) of `model` on random inputs, as a closure."""
    denoiser = KarrasDenoiser(sigma_data=0.5, loss_norm="l2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *shape, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    sigmas = torch.exp(torch.randn(batch, device=device, generator=g) * 1.2 - 1.2)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = denoiser.training_losses(model, x, sigmas, model_kwargs={"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def count_flops(step):
    """FLOPs of one call of `step` (forward and backward matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def measure(name, batch, device, bf16, steps):
    torch.manual_seed(0)
    model, shape = build(name)
    model.to(device).train()
    step = step_function(model, shape, batch, device, bf16)
    flops = count_flops(step)  # also the warm-up step
    times = sorted(time_call(step, device) for _ in range(steps))
    seconds = times[len(times) // 2]
    params = sum(p.numel() for p in model.parameters())
    return dict(params=params, flops=flops, seconds=seconds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=2, help="samples per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    p.add_argument("--sizes", default="B/2,adm64", help="comma list of DiT sizes and/or adm64")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32 and bf16 (autocast)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    results = {}
    for precision in args.precisions.split(","):
        for name in args.sizes.split(","):
            r = measure(name, args.batch, device, precision == "bf16", args.steps)
            results[name, precision] = r
            label = "ADM ImageNet-64 UNet" if name == "adm64" else f"DiT-{name} (32x32x4 latents)"
            print(f"{label:30s} {precision}: {r['params'] / 1e6:7.1f}M parameters, {r['flops'] / 1e9 / args.batch:7.1f} "
                  f"GFLOP/sample per step, {r['seconds']:7.3f} s/step, {r['flops'] / r['seconds'] / 1e9:7.1f} GFLOP/s",
                  flush=True)
    names = args.sizes.split(",")
    if "adm64" in names:
        for precision in args.precisions.split(","):
            base = results["adm64", precision]
            for name in names:
                if name != "adm64":
                    r = results[name, precision]
                    print(f"DiT-{name} / ADM-64 {precision}: step time {r['seconds'] / base['seconds']:.2f}x, "
                          f"FLOPs {r['flops'] / base['flops']:.2f}x, FLOP/s "
                          f"{(r['flops'] / r['seconds']) / (base['flops'] / base['seconds']):.2f}x")
    return results


if __name__ == "__main__":
    main()
