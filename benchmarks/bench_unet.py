"""Forward+backward throughput of the ADM UNet: SDPA attention against a plain matmul-softmax attention.

    python benchmarks/bench_unet.py                 # CPU: a small 16 px and a 64 px configuration
    python benchmarks/bench_unet.py --device cuda   # adds bf16 autocast at the ImageNet-64 width

Prints images/s for both attention paths and their ratio; it asserts nothing.
"""

import argparse
import math

import torch

import cm.unet as unet
from cm.script_util import create_model
from timing import time_call

CONFIGS = {
    "small-16px": dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                       attention_resolutions="8,4", num_head_channels=32),
    "64px": dict(image_size=64, num_channels=64, num_res_blocks=2, channel_mult="1,2,3,4",
                 attention_resolutions="32,16,8", num_head_channels=32, use_scale_shift_norm=True),
    "imagenet64": dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="1,2,3,4",
                       attention_resolutions="32,16,8", num_head_channels=64, use_scale_shift_norm=True,
                       resblock_updown=True),
}


def matmul_softmax_attention(qkv, num_heads, layout="flash"):
    """softmax(q k^T / sqrt(d)) v with explicit matrices (what the reference's fallback computes, in fp32)."""
    q, k, v = unet.split_qkv(qkv, num_heads, layout)
    weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v
    b, h, t, d = out.shape
    return out.transpose(-1, -2).reshape(b, h * d, t)


def images_per_second(model, batch, size, device, dtype, steps):
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.rand(batch, device=device) * 1000
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, t)
        out.float().square().mean().backward()

    for _ in range(2):
        step()
    seconds = time_call(lambda: [step() for _ in range(steps)], device)
    return batch * steps / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = [("small-16px", 32, torch.float32), ("64px", 8, torch.float32)]
    if device.type == "cuda":
        cases += [("imagenet64", 64, torch.bfloat16)]
    sdpa = unet.qkv_attention
    for name, batch, dtype in cases:
        torch.manual_seed(0)
        model = create_model(**CONFIGS[name]).to(device)
        rates = {}
        for label, fn in (("sdpa", sdpa), ("matmul", matmul_softmax_attention)):
            unet.qkv_attention = fn
            rates[label] = images_per_second(model, batch, CONFIGS[name]["image_size"], device, dtype, args.steps)
        unet.qkv_attention = sdpa
        print(f"{name:11s} batch {batch:3d} {str(dtype).replace('torch.', ''):8s} sdpa {rates['sdpa']:8.1f} img/s   "
              f"matmul {rates['matmul']:8.1f} img/s   ratio {rates['sdpa'] / rates['matmul']:.2f}x")


if __name__ == "__main__":
    main()
