"""Worker for the fsdp tests: tiny training runs under one launch (torchrun or mpiexec), so the process group is
started once for several runs.

    python fsdp_worker.py OUT PLAN

PLAN names the runs, comma separated, each MODE:PARALLEL:STEPS[:OPTION] (e.g. "scd:ddp:4,scd:fsdp:4"); each
trains in OUT/MODE-PARALLEL[-OPTION] (resuming what is there) after an EDM teacher in OUT/teacher. A run with
STEPS "+N" continues its log dir N steps past its last checkpoint. FSDP_TEST_TEACHER names another teacher file. OPTION: bf16 (bfloat16) or async
(--async_checkpoint).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import dist_util  # noqa: E402
from cm.train_cli import main  # noqa: E402

from helpers import tiny_argv  # noqa: E402

SMALL = dict(channel_mult="1,1")
# every network of the run has an attention block and an output layer of 3 channels, split unevenly over the ranks
COMMON = dict(ema_rate="0.9,0.99", save_interval=5, batch_size=-1, global_batch_size=8, dropout=0.0, lr=float(os.environ.get("FSDP_TEST_LR", "2e-5")),
              optimizer=os.environ.get("FSDP_TEST_OPTIMIZER", "adam"))
MODE_FLAGS = {
    "scd": dict(logvar_channels=16, tangent_warmup_steps=2, time_conditioning="edm", init_from_teacher="true"),
    "cd": dict(loss_norm="l2"),
    "sct": dict(logvar_channels=16, tangent_warmup_steps=2, time_conditioning="trigflow"),
    "ct": dict(loss_norm="l2"),
    "edm": dict(),
    "ect": dict(loss_norm="l2"),
    "meanflow": dict(),
    "progdist": dict(scale_mode="progdist", start_scales=4, distill_steps_per_iter=1, loss_norm="l2"),
    "ayf": dict(loss_norm="l2"),
    "tcm": dict(loss_norm="l2"),
    "cmt": dict(loss_norm="l2"),
}
TRAINING_MODE = {"cd": "consistency_distillation", "ct": "consistency_training", "ect": "consistency_tuning"}
NEEDS_TEACHER = ("scd", "cd", "ect", "progdist", "ayf", "tcm", "cmt")


def train(out, mode, parallel, steps, option, teacher):
    log_dir = os.path.join(out, "-".join([mode, parallel] + ([option] if option else [])))
    if steps.startswith("+"):
        done = max((int(n[5:11]) for n in os.listdir(log_dir) if n.startswith("state")), default=0)
        steps = done + int(steps[1:])
    flags = dict(COMMON, **MODE_FLAGS[mode], log_dir=log_dir, total_training_steps=int(steps), parallel=parallel)
    if mode in NEEDS_TEACHER:
        flags["teacher_model_path"] = teacher
    if option == "bf16":
        flags["use_bf16"] = "true"
    if option == "async":
        flags["async_checkpoint"] = "true"
    main(TRAINING_MODE.get(mode, mode), tiny_argv(**SMALL, **flags))


def run(out, plan):
    teacher_dir = os.path.join(out, "teacher")
    teacher = os.environ.get("FSDP_TEST_TEACHER") or os.path.join(teacher_dir, "model000002.pt")
    if not os.path.exists(teacher):
        main("edm", tiny_argv(**SMALL, log_dir=teacher_dir, total_training_steps=2))
    for item in plan.split(","):
        mode, parallel, steps, *rest = item.split(":")
        train(out, mode, parallel, steps, rest[0] if rest else "", teacher)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    dist_util.setup_dist()
    run(sys.argv[1], sys.argv[2])
