"""The CPU's fused attention (torch's scaled_dot_product_attention) in float32 against bfloat16, by sequence length.

    python benchmarks/bench_attention.py

Prints milliseconds per call for the forward alone and for forward + backward, at the head shapes of the library's
networks (batch 8, 4 heads, 32- and 64-wide heads), and the bfloat16 / float32 time ratio (above 1: float32 is
faster). cm.nn.CPU_FP32_ATTENTION_MAX_TOKENS is set from these numbers. Asserts nothing.
"""

import argparse

import torch
import torch.nn.functional as F

from timing import time_call


def attention_ms(shape, dtype, backward, repeats):
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=backward) for _ in range(3))

    def call():
        out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.sum().backward()

    call()
    return 1e3 * min(time_call(call, "cpu") for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| tokens | head width | pass | float32 ms | bfloat16 ms | bf16 / fp32 |\n|---|---|---|---|---|---|")
    for tokens in (16, 64, 256, 1024):
        for width in (32, 64):
            for backward in (False, True):
                shape = (8, 4, tokens, width)
                fp32, bf16 = (attention_ms(shape, dtype, backward, args.repeats) for dtype in (torch.float32,
                                                                                            torch.bfloat16))
                name = "forward + backward" if backward else "forward"
                print(f"| {tokens} | {width} | {name} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
