"""Worker of the world-size-change test: tiny consistency-training runs on the digits, global batch 8.

Run as `python resize_worker.py STEPS LOG_DIR[:STOP_AT] ...` (one process, or under `mpiexec -n K`): each LOG_DIR
is a run configured for STEPS steps (resumed when the folder holds a checkpoint), stopped with a checkpoint after
STOP_AT steps when given (as if killed there).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm.train_cli import build_loop, create_argparser  # noqa: E402

from helpers import tiny_argv  # noqa: E402

GLOBAL_BATCH = 8
MODE = "consistency_training"


def resize_argv(log_dir, steps):
    """Flags of the runs: fp32, dropout 0, RAdam (whose first steps are momentum SGD, so round-off in gradients that
    are zero in exact arithmetic stays round-off instead of becoming Adam updates of order lr)."""
    return tiny_argv(log_dir=log_dir, total_training_steps=steps, batch_size=-1, global_batch_size=GLOBAL_BATCH,
                     optimizer="radam", lr=0.02, loss_norm="l2", ema_rate=0.5, dropout=0.0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    steps = int(argv[0])
    for job in argv[1:]:
        log_dir, _, stop_at = job.partition(":")
        loop = build_loop(create_argparser(MODE).parse_args(resize_argv(log_dir, steps)))
        if stop_at:
            loop.total_training_steps = int(stop_at)
        loop.run_loop()


if __name__ == "__main__":
    main()
