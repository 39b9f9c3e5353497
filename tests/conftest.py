import os

import pytest
import torch

# Tests run on CPU with one thread: tiny models gain little from a second one, and a busy second core
# makes two-thread parallel regions wait for each other (10x slower steps were seen).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _shared_cache(tmp_path_factory):
    """One cache folder for the whole run, never the user's ~/.cache: the digits classifier is trained once, and a
    clean machine runs the same tests as a warm one."""
    os.environ["CM_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "cm-cache")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def edm_teacher_path(tmp_path_factory):
    """A few-step EDM checkpoint of the tiny digits model, trained once per test run (a teacher or starting point
    for the distillation and tuning tests)."""
    from cm.train_cli import main

    from helpers import tiny_argv

    log_dir = tmp_path_factory.mktemp("edm_teacher")
    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=2))
    return str(log_dir / "model000002.pt")
