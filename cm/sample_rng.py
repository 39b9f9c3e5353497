"""Random draws indexed by (seed, step, global sample), so a run continues the same way on any number of ranks.

Data-parallel training splits each step's global batch of G samples into per-rank batches and micro-batches. The
loss draws noise, noise levels and labels to drop for the rows it sees; drawn from per-rank streams, these depend
on the split. Under `SampleIndexedDraws`, a torch.overrides.TorchFunctionMode entered around one micro-batch's
loss, the k-th draw without an explicit generator becomes

    per-sample draw (leading dimension = the micro-batch's rows):  full = draw((G, ...), gen(seed, step, k)),
                                                                     result = full[offset : offset + rows]
    any other draw:                                                  draw(shape, gen(seed, step, k)), the same on
                                                                     every rank and micro-batch

where offset is the micro-batch's first row in the global batch and gen a fresh generator on the draw's device.
Sample i of step s then gets the same values whatever the layout (1 rank x 8, 2 ranks x 4, micro-batches of 2).
Every other operation passes through after one dictionary lookup.

Dropout masks come from the device's default RNG (slicing them per sample would cost a second network pass);
`micro_batch` reseeds it from (seed, step, offset) before each micro-batch, so a resume with the same layout needs
no saved RNG state, and with dropout > 0 a change of the number of ranks continues the run statistically, not bit
for bit. Draws inside `cm.random_util.DeviceRNG.replaying` (a consistency pair's target pass) replay the online
pass's dropout masks as before: the indexed draws use generators of their own and leave the default RNG alone.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_MASK64 = (1 << 64) - 1
PER_SAMPLE, SHARED, DROPOUT = 1, 2, 3  # stream tags: the three kinds of seeds never coincide


def mix_seed(*values):
    """A 63-bit seed from integers (splitmix64 over each value in turn): distinct tuples give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


# ----- how each random function is split into shape, full draw and slice ----------------------------------------


def _size(args, kwargs):
    """(shape, the other positional arguments) of randn / rand style arguments: ints, a sequence, or size=."""
    if "size" in kwargs:
        return tuple(kwargs.pop("size")), ()
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0]), ()
    return tuple(args), ()


def _randint_size(args, kwargs):
    """(shape, (low, high) or (high,)) of torch.randint's arguments."""
    if "size" in kwargs:
        return tuple(kwargs.pop("size")), tuple(args)
    return tuple(args[-1]), tuple(args[:-1])


def _factory(func, size_of):
    """A per-sample draw of a factory function (randn, rand, randint): full (G, ...) draw, rows sliced."""

    def split(args, kwargs):
        shape, numbers = size_of(args, kwargs)
        device = torch.device(kwargs.get("device") or "cpu")
        return shape, device, lambda full_shape, g: func(*numbers, size=full_shape, generator=g, **kwargs)

    return split


def _like(func, factory):
    """A per-sample draw of a *_like function: the factory draw of the input's shape, dtype and device, laid out
    like the input."""

    def split(args, kwargs):
        source, numbers = args[0], tuple(args[1:])
        dtype = kwargs.pop("dtype", None) or source.dtype
        device = torch.device(kwargs.pop("device", None) or source.device)
        memory_format = kwargs.pop("memory_format", torch.preserve_format)

        def draw(full_shape, g):
            return factory(*numbers, size=full_shape, generator=g, dtype=dtype, device=device, **kwargs)

        def finish(rows):
            out = torch.empty_like(source, dtype=dtype, device=device, memory_format=memory_format)
            return out.copy_(rows)

        return tuple(source.shape), device, draw, finish

    return split


def _normal(args, kwargs):
    """torch.normal: (mean, std, size) numbers draw directly; tensor means or stds as mean + std * N(0, 1)."""
    mean = kwargs.pop("mean", args[0] if args else 0.0)
    std = kwargs.pop("std", args[1] if len(args) > 1 else 1.0)
    if len(args) > 2 or "size" in kwargs:
        shape = tuple(kwargs.pop("size", args[2] if len(args) > 2 else ()))
        device = torch.device(kwargs.get("device") or "cpu")
        return shape, device, lambda full_shape, g: torch.normal(mean, std, full_shape, generator=g, **kwargs), (
            lambda rows: rows)
    tensors = [v for v in (mean, std) if torch.is_tensor(v)]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    dtype, device = tensors[0].dtype, tensors[0].device

    def draw(full_shape, g):
        return torch.randn(full_shape, generator=g, dtype=dtype, device=device)

    return tuple(shape), device, draw, lambda rows: mean + std * rows


def _multinomial(args, kwargs):
    """torch.multinomial of one distribution with replacement: num_samples is the sample dimension."""
    probs = args[0]
    num_samples = kwargs.pop("num_samples", args[1] if len(args) > 1 else None)
    replacement = kwargs.pop("replacement", args[2] if len(args) > 2 else False)
    if probs.dim() != 1 or not replacement:  # without replacement the samples are not independent: not per sample
        return None
    return (num_samples,), probs.device, lambda full_shape, g: torch.multinomial(
        probs, full_shape[0], True, generator=g, **kwargs)


def _split_as_is(split):
    """A split whose result needs no finishing (the rows of the full draw are the result)."""

    def with_identity(args, kwargs):
        parts = split(args, kwargs)
        return None if parts is None else (*parts, lambda rows: rows)

    return with_identity


DRAWS = {  # random function -> how to split it into a per-sample draw (None: always drawn whole)
    torch.randn: _split_as_is(_factory(torch.randn, _size)),
    torch.rand: _split_as_is(_factory(torch.rand, _size)),
    torch.randint: _split_as_is(_factory(torch.randint, _randint_size)),
    torch.randn_like: _like(torch.randn_like, torch.randn),
    torch.rand_like: _like(torch.rand_like, torch.rand),
    torch.randint_like: _like(torch.randint_like, torch.randint),
    torch.normal: _normal,
    torch.multinomial: _split_as_is(_multinomial),
    torch.randperm: None,  # a permutation of the batch is not a per-sample draw
}
_PASS = object()


def _device_of(func, args, kwargs):
    """The device a random function draws on (for the generator that replaces the default one)."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    tensors = [a for a in args if torch.is_tensor(a)]
    return tensors[0].device if tensors else torch.device("cpu")


class SampleIndexedDraws(TorchFunctionMode):
    """Inside: random draws without a generator are indexed by (seed, step, global sample) (see the module header).

    :param seed: the run's seed.
    :param step: the training step.
    :param global_batch: G, the samples of a step over all ranks.
    :param offset: the global row of this micro-batch's first sample.
    :param rows: the micro-batch's samples.
    """

    def __init__(self, seed, step, global_batch, offset, rows):
        super().__init__()
        if offset < 0 or offset + rows > global_batch:
            raise ValueError(f"rows [{offset}, {offset + rows}) lie outside the global batch of {global_batch}")
        self.seed, self.step, self.global_batch, self.offset, self.rows = seed, step, global_batch, offset, rows
        self.draws = 0  # ordinal of the next draw

    def _generator(self, device, tag, ordinal):
        return torch.Generator(device).manual_seed(mix_seed(self.seed, self.step, ordinal, tag))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        split = DRAWS.get(func, _PASS)
        if split is _PASS or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        ordinal, self.draws = self.draws, self.draws + 1
        kwargs = {k: v for k, v in kwargs.items() if k != "generator"}  # an explicit generator=None
        parts = split(args, dict(kwargs)) if split is not None else None
        if parts is not None and parts[0] and parts[0][0] == self.rows:
            shape, device, draw, finish = parts
            full = draw((self.global_batch, *shape[1:]), self._generator(device, PER_SAMPLE, ordinal))
            return finish(full[self.offset : self.offset + self.rows])
        return func(*args, generator=self._generator(_device_of(func, args, kwargs), SHARED, ordinal), **kwargs)


def reseed_default_rng(seed, step, offset):
    """Seed the default RNGs (CPU and GPUs: dropout masks) from (seed, step, global row offset)."""
    torch.manual_seed(mix_seed(seed, step, offset, DROPOUT))


class SampleRNG:
    """The training loop's side: one context per micro-batch, or nothing when the run keeps per-rank streams.

    :param enabled: index the draws by sample (False: the default RNG of each rank, as before).
    :param seed: the run's seed.
    :param global_batch: G, the samples of a step over all ranks.
    :param first_row: the global row of this rank's first sample (rank * per-rank batch).
    """

    RESIZE_NOTE = ("the sample-indexed draws and the data position continue the run's trajectory (with dropout > 0, "
                   "statistically: dropout masks follow the layout)")

    def __init__(self, enabled, seed, global_batch, first_row):
        self.enabled, self.seed, self.global_batch, self.first_row = enabled, seed, global_batch, first_row

    def micro_batch(self, step, start, rows):
        """The context of the micro-batch of `rows` samples at row `start` of this rank's batch in `step`: the
        default RNG reseeded, the draws indexed by sample."""
        if not self.enabled:
            return contextlib.nullcontext()
        offset = self.first_row + start
        reseed_default_rng(self.seed, step, offset)
        return SampleIndexedDraws(self.seed, step, self.global_batch, offset, rows)
