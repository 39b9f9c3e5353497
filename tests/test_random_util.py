"""The determ generator reads later batches' noise from its first batch: the values must be those of drawing all
num_samples rows on every call (the algorithm before, written out here), and sampling must give the same images."""

import numpy as np
import pytest
import torch

from cm.image_util import generate_samples, rank_batches, to_uint8
from cm.random_util import DeterministicGenerator, get_generator
from cm.sampling import karras_sample

from helpers import tiny_model_and_diffusion


class FullDrawGenerator:
    """determ as it was: every call draws all num_samples rows from the seeded stream and keeps this batch's;
    set_done_samples restarts the stream."""

    def __init__(self, num_samples, seed, rank=0, world_size=1):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.done_samples = 0
        self.generators = {}

    def get_generator(self, device):
        key = str(torch.device(device))
        if key not in self.generators:
            self.generators[key] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[key]

    def indices(self, batch):
        start = self.done_samples + self.rank
        return torch.arange(start, start + self.world_size * batch, self.world_size).clamp(0, self.num_samples - 1)

    def randn(self, *size, dtype=torch.float32, device="cpu"):
        full = torch.randn(self.num_samples, *size[1:], generator=self.get_generator(device), dtype=dtype, device=device)
        return full[self.indices(size[0])]

    def randn_like(self, tensor):
        return self.randn(*tensor.shape, dtype=tensor.dtype, device=tensor.device)

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        shape = (self.num_samples, *size[1:])
        return torch.randint(low, high, shape, generator=self.get_generator(device), dtype=dtype, device=device)[
            self.indices(size[0])
        ]

    def set_done_samples(self, done_samples):
        self.done_samples = done_samples
        for g in self.generators.values():
            g.manual_seed(self.seed)


# draws per batch: y labels, x images, d float64, g a draw straight from get_generator's torch.Generator
PATTERNS = {
    "onestep": lambda done: "x",
    "multistep with labels": lambda done: "yxxx",
    "dtypes": lambda done: "xdx",
    "batches differ": lambda done: "xx" if done % 2 else "xdxx",
    "direct draws": lambda done: "xgx",
}


def draw_all(gen, num_samples, batch_size, world_size, pattern):
    """Every value one rank draws over a run, in order."""
    out = []
    for done, batch in rank_batches(num_samples, batch_size, world_size):
        gen.set_done_samples(done)
        for kind in pattern(done):
            if kind == "y":
                out.append(gen.randint(0, 10, (batch,)).double())
            elif kind == "x":
                out.append(gen.randn(batch, 3, 4, 4).double())
            elif kind == "d":
                out.append(gen.randn(batch, 2, dtype=torch.float64))
            else:
                out.append(torch.randn(3, generator=gen.get_generator("cpu")).double())
    return torch.cat([o.flatten() for o in out])


def cache_budget(which, num_samples, world_size):
    """CACHE_BYTES that keeps every draw, none, or one x draw (and the labels) but not a second."""
    x_draw = (-(-num_samples // world_size) + 1) * 3 * 4 * 4 * 4
    return {"all": DeterministicGenerator.CACHE_BYTES, "none": 0, "one": x_draw + 8 * (num_samples + 1)}[which]


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("cache", ["all", "none", "one"])
def test_determ_draws_equal_full_draws(pattern, cache):
    for num_samples, batch_size, world_size in [(1, 4, 1), (7, 3, 1), (16, 5, 1), (7, 2, 2), (16, 3, 3), (2, 1, 3)]:
        for rank in range(world_size):
            new = DeterministicGenerator(num_samples, seed=5)
            new.rank, new.world_size = rank, world_size
            new.CACHE_BYTES = cache_budget(cache, num_samples, world_size)
            old = FullDrawGenerator(num_samples, 5, rank, world_size)
            args = (num_samples, batch_size, world_size, PATTERNS[pattern])
            assert torch.equal(draw_all(new, *args), draw_all(old, *args)), (num_samples, batch_size, rank)


def test_later_batches_read_the_cache_which_holds_this_ranks_rows_once(monkeypatch):
    full = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    g = DeterministicGenerator(10, seed=1)
    g.rank, g.world_size = 1, 3
    assert torch.equal(g.randn(2, 3, 4, 4), full[[1, 4]])
    kept = g._draws[0]
    assert kept.kept.tolist() == [1, 4, 7, 9] and kept.rows.shape == (4, 3, 4, 4)  # 9: the clamped last sample
    draws = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(a))
    g.set_done_samples(6)
    assert torch.equal(g.randn(2, 3, 4, 4), full[[7, 9]]) and not draws  # samples 7 and 10 -> 9, no new draw
    monkeypatch.undo()
    assert torch.equal(g.get_generator("cpu").get_state(), kept.state_after)  # the stream sits after draw 0
    g.set_seed(2)
    assert not g._draws


def sampling_model(**kw):
    """A tiny consistency model whose zero-initialised output layers get random weights (so images depend on it)."""
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion(distillation=True, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval().requires_grad_(False), diffusion


def old_samples(model, diffusion, num_samples, batch_size, seed, num_classes, sampler_kwargs):
    """generate_samples' images and labels made with the full-draw generator (one process)."""
    gen = FullDrawGenerator(num_samples, seed)
    images, labels = [], []
    for done, batch in rank_batches(num_samples, batch_size, 1):
        gen.set_done_samples(done)
        y = gen.randint(0, num_classes, (batch,))
        with torch.inference_mode():
            x = karras_sample(diffusion, model, (batch, 3, 8, 8), model_kwargs={"y": y}, generator=gen, **sampler_kwargs)
        images.append(to_uint8(x).numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("sampler", ["onestep", "multistep"])
def test_generate_samples_gives_the_images_of_full_draws(sampler):
    model, diffusion = sampling_model(class_cond=True, num_classes=10)
    kw = dict(sampler=sampler, steps=40, ts=(0, 10, 39) if sampler == "multistep" else None)
    images, labels = generate_samples(diffusion, model, 7, 3, 8, get_generator("determ", 7, 4), kw, num_classes=10,
                                      progress=False)
    expected_images, expected_labels = old_samples(model, diffusion, 7, 3, 4, 10, kw)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


def test_generate_samples_with_determ_indiv_gives_each_samples_own_stream():
    model, diffusion = sampling_model()
    kw = dict(sampler="multistep", steps=40, ts=(0, 10, 39))
    images, _ = generate_samples(diffusion, model, 5, 2, 8, get_generator("determ-indiv", 5, 3), kw, progress=False)
    for done, batch in rank_batches(5, 2, 1):
        gen = get_generator("determ-indiv", 5, 3)
        gen.set_done_samples(done)
        with torch.inference_mode():
            x = karras_sample(diffusion, model, (batch, 3, 8, 8), generator=gen, **kw)
        assert np.array_equal(images[done : done + batch], to_uint8(x).numpy())


def test_replaying_repeats_the_draws_since_a_state_then_goes_on_past_them():
    from cm.random_util import DeviceRNG

    rng = DeviceRNG("cpu")
    torch.manual_seed(3)
    state = rng.get_state()
    online = torch.rand(5)
    with rng.replaying(state):
        replayed = torch.rand(5)
    after = torch.rand(5)
    torch.manual_seed(3)
    stream = torch.rand(10)
    assert torch.equal(replayed, online)  # the target pass sees the online pass's draws (its dropout masks)
    assert torch.equal(after, stream[5:])  # and afterwards the stream continues, nothing drawn twice
