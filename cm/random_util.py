"""Random number generators for sampling: global ("dummy"), one seeded stream ("determ"), one stream per sample ("determ-indiv").

"determ" and "determ-indiv" make sample k of a run depend only on the seed and k, not on the batch
size or the number of ranks. A batch on rank r covers the global sample indices
``done_samples + r, done_samples + r + world_size, ...``; call `set_done_samples` after each batch.
"""

import contextlib

import torch
import torch.distributed as dist

GENERATORS = ("dummy", "determ", "determ-indiv")


def get_generator(generator, num_samples=0, seed=0):
    """The generator named `generator` for a run of `num_samples` samples seeded with `seed`."""
    if generator == "dummy":
        return DummyGenerator()
    if generator == "determ":
        return DeterministicGenerator(num_samples, seed)
    if generator == "determ-indiv":
        return DeterministicIndividualGenerator(num_samples, seed)
    raise ValueError(f"unknown generator {generator!r}; allowed: {', '.join(GENERATORS)}")


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DummyGenerator:
    """The global torch RNG behind the generator interface."""

    def randn(self, *size, **kwargs):
        return torch.randn(*size, **kwargs)

    def randint(self, *args, **kwargs):
        return torch.randint(*args, **kwargs)

    def randn_like(self, *args, **kwargs):
        return torch.randn_like(*args, **kwargs)

    def set_done_samples(self, done_samples):
        pass


class _IndexedGenerator:
    """Shared bookkeeping: which global sample indices this rank's next batch covers."""

    def __init__(self, num_samples, seed=0):
        if num_samples <= 0:
            raise ValueError(f"a deterministic generator needs num_samples > 0, got {num_samples}")
        self.rank, self.world_size = _rank_and_world()
        self.num_samples = num_samples
        self.done_samples = 0
        self.seed = seed

    def indices(self, batch_size):
        """Global indices of this rank's batch, clamped to the last sample for a ragged final batch."""
        start = self.done_samples + self.rank
        idx = torch.arange(start, start + self.world_size * int(batch_size), self.world_size)
        return idx.clamp(0, self.num_samples - 1)

    def get_global_size_and_indices(self, size):
        """The reference's helper: (shape of the draw for all num_samples, this batch's global indices)."""
        return (self.num_samples, *size[1:]), self.indices(size[0])

    def get_size_and_indices(self, size):
        """The reference's helper: (shape of one sample's draw, this batch's global indices)."""
        return (1, *size[1:]), self.indices(size[0])

    def randn_like(self, tensor):
        return self.randn(*tensor.shape, dtype=tensor.dtype, device=tensor.device)

    def get_seed(self):
        return self.seed


class _Draw:
    """One recorded draw of a batch: what was drawn, its generator's state after it, and this rank's rows of it."""

    def __init__(self, signature, state_after, kept=None, rows=None):
        self.signature, self.state_after, self.kept, self.rows = signature, state_after, kept, rows

    def lookup(self, indices):
        """Rows at global `indices` (a fresh tensor), or None when some were not kept."""
        if self.rows is None:
            return None
        pos = torch.searchsorted(self.kept, indices)
        pos = pos.clamp(max=len(self.kept) - 1)
        if not torch.equal(self.kept[pos], indices):
            return None
        return self.rows.index_select(0, pos.to(self.rows.device))


class DeterministicGenerator(_IndexedGenerator):
    """One seeded stream that draws noise for all num_samples at once and keeps this batch's rows.

    Every batch restarts the stream (set_done_samples), so the k-th draw of every batch is the same full
    tensor. The first batch keeps this rank's rows of each draw, ceil(num_samples / world_size) rows, while
    they fit in CACHE_BYTES; later batches read their rows from there instead of drawing num_samples rows
    again. A draw that was not kept is made in full from its generator's recorded state, so every value is
    the one of the full draw, as before.
    """

    CACHE_BYTES = 4 * 2**30  # per generator; e.g. ImageNet-64, 50,000 samples, one rank: 2.4 GB per draw

    def __init__(self, num_samples, seed=0):
        super().__init__(num_samples, seed)
        self._generators = {}
        self._draws = []
        self._restart()

    def _restart(self):
        """Back to the start of the stream: the next draw is draw 0 of a batch."""
        self._calls = 0
        self._matching = True  # this batch's draws so far are the recorded ones
        self._pending = {}  # device -> generator state to set before its next real draw

    def _generator(self, device):
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[key]

    def _live(self, device):
        """The device's generator, moved past the draws that were read from the cache."""
        generator = self._generator(device)
        state = self._pending.pop(str(torch.device(device)), None)
        if state is not None:
            generator.set_state(state)
        return generator

    def get_generator(self, device):
        """The seeded torch.Generator this generator draws from on `device` (drawing from it directly turns
        the cache off until the next batch)."""
        self._matching = False
        return self._live(device)

    def _keep(self, full):
        """(global indices, rows) of `full` that this rank's batches read: every world_size-th, and the last."""
        kept = torch.arange(self.rank, max(self.rank, self.num_samples), self.world_size)
        if not len(kept) or kept[-1] != self.num_samples - 1:
            kept = torch.cat([kept, torch.tensor([self.num_samples - 1])])
        if len(kept) == self.num_samples:
            return kept, full
        return kept, full.index_select(0, kept.to(full.device))

    def _record(self, signature, full, generator):
        """Append draw k's record; keep this rank's rows of it while the kept rows stay within CACHE_BYTES."""
        used = sum(d.rows.numel() * d.rows.element_size() for d in self._draws if d.rows is not None)
        rows_needed = -(-self.num_samples // self.world_size) + 1
        kept, rows = None, None
        if used + rows_needed * (full.numel() // self.num_samples) * full.element_size() <= self.CACHE_BYTES:
            kept, rows = self._keep(full)
        self._draws.append(_Draw(signature, generator.get_state(), kept, rows))

    def _draw(self, signature, batch, device, draw_full):
        """This batch's rows of the next full draw `draw_full(generator)`, read from the cache when recorded."""
        k, self._calls = self._calls, self._calls + 1
        indices = self.indices(batch)
        recorded = self._draws[k] if self._matching and k < len(self._draws) else None
        if recorded is not None and recorded.signature != signature:
            recorded, self._matching = None, False
        if recorded is not None:
            rows = recorded.lookup(indices)
            if rows is not None:
                self._pending[str(torch.device(device))] = recorded.state_after
                return rows
        generator = self._live(device)
        full = draw_full(generator)
        if self._matching and k == len(self._draws):
            self._record(signature, full, generator)
        return full[indices.to(full.device)]

    def randn(self, *size, dtype=torch.float32, device="cpu"):
        shape = (self.num_samples, *size[1:])
        signature = ("randn", shape, dtype, str(torch.device(device)))
        return self._draw(signature, size[0], device,
                          lambda g: torch.randn(*shape, generator=g, dtype=dtype, device=device))

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        shape = (self.num_samples, *size[1:])
        signature = ("randint", low, high, shape, dtype, str(torch.device(device)))
        return self._draw(signature, size[0], device,
                          lambda g: torch.randint(low, high, shape, generator=g, dtype=dtype, device=device))

    def set_done_samples(self, done_samples):
        """Move to the batch after `done_samples` samples and restart the stream, so every batch sees the same draws."""
        self.done_samples = done_samples
        for g in self._generators.values():
            g.manual_seed(self.seed)
        self._restart()

    def set_seed(self, seed):
        self.seed = seed
        self._draws = []
        for g in self._generators.values():
            g.manual_seed(seed)
        self._restart()


class _PerSampleGenerators:
    """A read-only sequence of one generator's per-sample streams on one device."""

    def __init__(self, owner, device):
        self.owner, self.device = owner, device

    def __len__(self):
        return self.owner.num_samples

    def __getitem__(self, index):
        if not 0 <= int(index) < len(self):
            raise IndexError(f"sample index {int(index)} out of range for {len(self)} samples")
        return self.owner._generator(index, self.device)


class DeterministicIndividualGenerator(_IndexedGenerator):
    """One stream per sample k, seeded with k + num_samples * seed: memory independent of num_samples."""

    def __init__(self, num_samples, seed=0):
        super().__init__(num_samples, seed)
        self._generators = {}

    def _generator(self, index, device):
        key = (int(index), str(torch.device(device)))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(int(index) + self.num_samples * self.seed)
        return self._generators[key]

    def get_generator(self, device):
        """Sample k's torch.Generator on `device` at index k (created on first use), as the reference's list."""
        return _PerSampleGenerators(self, device)

    def randn(self, *size, dtype=torch.float32, device="cpu"):
        rows = [
            torch.randn(1, *size[1:], generator=self._generator(i, device), dtype=dtype, device=device)
            for i in self.indices(size[0]).tolist()
        ]
        return torch.cat(rows, dim=0)

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        rows = [
            torch.randint(low, high, (1, *size[1:]), generator=self._generator(i, device), dtype=dtype, device=device)
            for i in self.indices(size[0]).tolist()
        ]
        return torch.cat(rows, dim=0)

    def set_done_samples(self, done_samples):
        """Move to the batch after `done_samples` samples; streams of finished samples are dropped."""
        self.done_samples = done_samples
        self._generators = {k: g for k, g in self._generators.items() if k[0] >= done_samples}

    def set_seed(self, seed):
        self.seed = seed
        self._generators = {}


class DeviceRNG:
    """Snapshot and restore the RNG state a device draws from: the CPU generator, plus the CUDA device's
    when `device` is a GPU (dropout masks there come from it). Used to replay dropout masks and in checkpoints."""

    def __init__(self, device):
        self.device = torch.device(device)

    def get_state(self):
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_state(self, state):
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    @contextlib.contextmanager
    def replaying(self, state):
        """Inside: the draws made since `state` was taken come again (a target pass gets the online pass's dropout
        masks). After: the RNG goes on from where it was on entry, so no draw is replayed twice."""
        now = self.get_state()
        self.set_state(state)
        try:
            yield
        finally:
            self.set_state(now)
