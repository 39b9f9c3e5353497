"""Cost of an sCM, MeanFlow or AYF training step (one forward, one JVP, one backward; AYF also a teacher forward)
against a plain consistency-training step.

    python benchmarks/bench_scm.py                      # the digits presets on the CPU, fp32 and bf16
    python benchmarks/bench_scm.py --precision fp32 --repeats 20
    python benchmarks/bench_scm.py --device cuda --imagenet64   # the ImageNet-64 network, bf16, batch 32

Each step is a whole CMTrainLoop.run_step built from the presets through the command line (CT: digits_ct.yaml on the
other presets' network and batch; sCT: digits_sct.yaml, and once more with its time embedding left to autocast, as
before --fp32_time_embedding; sCD: digits_scd.yaml with an untrained EDM teacher of the same network; MeanFlow:
digits_meanflow.yaml, the same network with its second time embedding; AYF: digits_ayf.yaml, that network
distilling from the sCD teacher); the cases are timed in turn (benchmarks/timing.py) so load on a shared machine hits
all alike. Also times the pieces of the sCT step on one batch: the online forward, the JVP pass (value and tangent),
the backward. Prints seconds per step and ratios to the CT step; asserts nothing.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import interleaved_seconds, time_call  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# digits_ct.yaml trains a DiT at batch 128 on CPUs; the other digits presets' UNet and batch, so that every case times
# the same network
DIGITS_CT_AS_OTHERS = ("--model_type", "adm", "--channel_mult", "1,2,2", "--batch_size", "32", "--class_cond", "false")
# (name, preset, training mode, flags over the preset); "sCT bf16 t" is sCT with the time embedding left to autocast
# (--fp32_time_embedding false), the step before sCT's default became a float32 time embedding
CASES = (("CT", "digits_ct.yaml", "consistency_training", DIGITS_CT_AS_OTHERS), ("sCT", "digits_sct.yaml", "sct", ()),
         ("sCT bf16 t", "digits_sct.yaml", "sct", ("--fp32_time_embedding", "false")),
         ("sCD", "digits_scd.yaml", "scd", ()), ("MeanFlow", "digits_meanflow.yaml", "meanflow", ()),
         ("AYF", "digits_ayf.yaml", "ayf", ()))
IMAGENET64 = ["--image_size", "64", "--num_channels", "192", "--num_res_blocks", "3", "--channel_mult", "1,2,3,4",
              "--attention_resolutions", "32,16,8", "--num_head_channels", "64", "--resblock_updown", "true",
              "--class_cond", "true", "--batch_size", "32"]


class RandomImages:
    """Endless (images in [-1, 1], labels) batches of a fixed shape (no data loading in the timed step)."""

    def __init__(self, batch, size, class_cond):
        self.batch, self.size, self.class_cond = batch, size, class_cond

    def __iter__(self):
        return self

    def __next__(self):
        cond = {"y": torch.randint(0, 1000, (self.batch,))} if self.class_cond else {}
        return torch.rand(self.batch, 3, self.size, self.size) * 2 - 1, cond


def teacher_checkpoint(args, extra):
    """An untrained EDM checkpoint of the digits network (the sCD teacher; its weights do not change the cost)."""
    from cm.config import resolve_model_config
    from cm.script_util import create_model, parse_args_with_config
    from cm.train_cli import create_argparser

    argv = ["--config", os.path.join(ROOT, "configs", "digits_edm.yaml"), *extra]
    flags = parse_args_with_config(create_argparser("edm"), argv)
    path = os.path.join(tempfile.mkdtemp(), "teacher.pt")
    torch.save(create_model(**resolve_model_config(flags)["network"]).state_dict(), path)
    return path


def build(config, mode, args, teacher, extra=()):
    from cm.script_util import parse_args_with_config
    from cm.train_cli import build_loop, create_argparser

    argv = ["--config", os.path.join(ROOT, "configs", config), "--log_dir", tempfile.mkdtemp(), "--device", args.device,
            "--use_bf16", str(args.bf16).lower(), "--log_interval", "1000000", "--save_interval", "-1",
            "--total_training_steps", "1000000", "--lr_anneal_steps", "0", *extra, *args.extra]
    if mode in ("scd", "ayf"):
        argv += ["--teacher_model_path", teacher]
    loop = build_loop(parse_args_with_config(create_argparser(mode), argv))
    loop.progress = False
    loop.data = RandomImages(loop.batch_size, loop.model.image_size, loop.model.num_classes is not None)
    return loop


def pieces(loop, device):
    """Seconds of the online forward, the JVP pass and the backward of one sCT batch (median of 5)."""
    from cm.modes.scm import trigflow_jvp, trigflow_t_lognormal
    from cm.trigflow import trigflow_velocity, trigflow_x_t

    x0, cond = next(loop.data)
    x0, cond = x0.to(device), {k: v.to(device) for k, v in cond.items()}
    t = trigflow_t_lognormal(x0.shape[0], device=device).float()
    z = torch.randn_like(x0) * 0.5
    x_t, v = trigflow_x_t(x0, z, t), trigflow_velocity(x0, z, t)
    net = loop.diffusion.network(loop.model)
    times = {"forward": [], "jvp": [], "backward": []}
    for _ in range(5):
        with loop.mp_trainer.autocast():
            times["forward"].append(time_call(lambda: net(x_t / 0.5, t, **cond), device))
            with torch.no_grad():
                times["jvp"].append(time_call(lambda: trigflow_jvp(net, x_t, t, v, model_kwargs=cond), device))
            out = net(x_t / 0.5, t, **cond)
        times["backward"].append(time_call(lambda: out.float().square().mean().backward(), device))
    return {k: sorted(v)[2] for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--imagenet64", action="store_true", help="the ImageNet-64 ADM network at batch 32 (for a GPU)")
    args = p.parse_args()
    torch.manual_seed(0)
    args.extra = IMAGENET64 if args.imagenet64 else []
    teacher = teacher_checkpoint(args, args.extra)
    for precision in (("fp32", "bf16") if args.precision == "both" else (args.precision,)):
        args.bf16 = precision == "bf16"
        loops = {name: build(config, mode, args, teacher, extra) for name, config, mode, extra in CASES}

        def step(loop):
            batch, cond = next(loop.data)
            return lambda r: loop.run_step(batch, cond)

        seconds = interleaved_seconds({name: step(loop) for name, loop in loops.items()}, args.repeats, args.device)
        per_step = {name: s / args.repeats for name, s in seconds.items()}
        batch = loops["CT"].batch_size
        print(f"\n{precision}, batch {batch}, {sum(q.numel() for q in loops['CT'].model.parameters()):,} parameters "
              f"({args.device}, {torch.get_num_threads()} threads)")
        for name, s in per_step.items():
            print(f"  {name:<11} {s:7.3f} s/step  {batch / s:7.1f} images/s  {s / per_step['CT']:5.2f}x CT")
        parts = pieces(loops["sCT"], args.device)
        total = sum(parts.values())
        print("  sCT pieces: " + ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in parts.items()))
        if args.device.startswith("cuda"):
            print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (all cases)")


if __name__ == "__main__":
    main()
