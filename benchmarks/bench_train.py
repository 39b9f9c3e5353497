"""Training-step throughput and peak memory of CT and CD (l2 / LPIPS) at a small config.

    python benchmarks/bench_train.py                # CPU: 32 px, 64 channels, batch 8 (the comparison config)
    python benchmarks/bench_train.py --imagenet64   # CUDA: the ImageNet-64 network, bf16

Each case runs in its own process so peak RSS (CPU) or peak allocated memory (CUDA) is its own.
Prints seconds per step, samples/s and peak memory; it asserts nothing.
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile

SMALL = dict(image_size=32, num_channels=64, num_res_blocks=2, attention_resolutions="16,8", channel_mult="1,2,2",
             num_heads=4, dropout=0.0)
IMAGENET64 = dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                  num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True, class_cond=True, dropout=0.0)


def run_case(case):
    import torch

    from cm import logger
    from cm.schedules import create_ema_and_scales_fn
    from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from timing import time_call
    from cm.train_util import CMTrainLoop

    torch.manual_seed(0)
    device = torch.device(case["device"])
    logger.configure(dir=tempfile.mkdtemp(), format_strs=[])
    kw = model_and_diffusion_defaults()
    kw.update(IMAGENET64 if case["imagenet64"] else SMALL)
    model, diffusion = create_model_and_diffusion(**kw, distillation=True, loss_norm=case["loss_norm"],
                                                  lpips_vgg_path=None)
    diffusion.lpips_pretrained = False
    teacher = teacher_diffusion = None
    if case["mode"] == "cd":
        teacher, teacher_diffusion = create_model_and_diffusion(**kw)
        teacher.to(device).eval()
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    model.to(device, memory_format=fmt)
    if teacher is not None:
        teacher.to(memory_format=fmt)
    batch = case["batch"]
    image_size = kw["image_size"]

    class Data:
        def __next__(self):
            cond = {"y": torch.randint(0, 1000, (batch,))} if kw["class_cond"] else {}
            return torch.rand(batch, 3, image_size, image_size) * 2 - 1, cond

    ct = case["mode"] == "ct"
    loop = CMTrainLoop(
        model=model, diffusion=diffusion, target_model=copy.deepcopy(model), teacher_model=teacher,
        teacher_diffusion=teacher_diffusion,
        training_mode="consistency_training" if ct else "consistency_distillation",
        ema_scale_fn=create_ema_and_scales_fn("adaptive" if ct else "fixed", 0.95, "progressive" if ct else "fixed",
                                              2 if ct else 40, 200 if ct else 40, 1000, 0),
        total_training_steps=1000, data=Data(), batch_size=batch, microbatch=-1, lr=1e-4, ema_rate="0.9999",
        log_interval=10**9, save_interval=-1, resume_checkpoint="", optimizer=case["optimizer"],
        use_bf16=case["bf16"], channels_last=case["channels_last"], progress=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(case["steps"]):
        x, cond = next(loop.data)
        times.append(time_call(lambda: loop.run_step(x, cond), device))
    warm = sorted(times[2:])
    step = warm[len(warm) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"s_per_step": step, "samples_per_s": batch / step, "peak_MiB": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet64", action="store_true")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "x") else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--optimizer", default="radam", choices=("radam", "adam", "adamw"))
    parser.add_argument("--channels_last", type=int, default=1)
    parser.add_argument("--bf16", type=int, default=None)
    parser.add_argument("--cases", default="ct-l2,cd-l2,cd-lpips")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    import torch

    device = args.device if (args.device != "cuda" or torch.cuda.is_available()) else "cpu"
    bf16 = bool(args.bf16) if args.bf16 is not None else (device == "cuda")
    batch = args.batch or (64 if args.imagenet64 else 8)
    print(f"device {device}, {'ImageNet-64' if args.imagenet64 else '32 px / 64 ch'} network, batch {batch}, "
          f"{args.optimizer}, {'bf16' if bf16 else 'fp32'}, channels_last={bool(args.channels_last)}")
    for name in args.cases.split(","):
        mode, norm = name.split("-")
        case = dict(mode=mode, loss_norm=norm, device=device, imagenet64=args.imagenet64, batch=batch,
                    steps=args.steps, optimizer=args.optimizer, channels_last=bool(args.channels_last), bf16=bf16)
        out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:10s} {r['s_per_step']:.3f} s/step  {r['samples_per_s']:.1f} samples/s  peak {r['peak_MiB']:.0f} MiB")


if __name__ == "__main__":
    main()
