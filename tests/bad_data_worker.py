"""Worker for the 2-rank bad-image test: each rank meets a different unreadable file of one folder.

Run as `python bad_data_worker.py DATA_DIR OUT_DIR` under `mpiexec -n 2` or torchrun. Writes rankR.json with the
state (bad files, counts) after one epoch under --max_bad_images 2, and the error that --max_bad_images 1 gives.
"""

import json
import os
import sys

from cm import dist_util
from cm.image_datasets import DataError, load_data


def stream(data_dir, max_bad_images):
    return load_data(data_dir=data_dir, batch_size=2, image_size=8, deterministic=True, random_flip=False,
                     max_bad_images=max_bad_images, num_workers=0)


def main():
    data_dir, out_dir = sys.argv[1], sys.argv[2]
    dist_util.setup_dist()
    data = stream(data_dir, 2)
    for _ in range(data.per_epoch):
        next(data)
    report = {"state": data.state_dict(), "error": None}
    data = stream(data_dir, 1)
    try:
        for _ in range(data.per_epoch):
            next(data)
    except DataError as e:
        report["error"] = str(e)
    with open(os.path.join(out_dir, f"rank{dist_util.get_rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
