"""Every public name of the reference's cm modules imports from the same module here and accepts the reference's
arguments (openai/consistency_models at e32b69e; script_util and train_util are checked elsewhere).

REFERENCE below is written from the reference's source: module -> {name: its parameter list}. "Class.method"
entries are methods; a name mapped to None is a constant or an alias. A reference call is accepted when every
reference parameter can be passed here the same way (same position and name, or *args / **kwargs), every
optional reference parameter is optional here, and nothing required here is missing from the reference.
"""

import importlib
import inspect
import math
import os
import re

import numpy as np
import pytest
import torch

REFERENCE = {
    "karras_diffusion": {
        "get_weightings": "weight_schedule, snrs, sigma_data",
        "KarrasDenoiser.__init__": "self, sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, rho=7.0, "
        "weight_schedule='karras', distillation=False, loss_norm='lpips'",
        "KarrasDenoiser.get_snr": "self, sigmas",
        "KarrasDenoiser.get_sigmas": "self, sigmas",
        "KarrasDenoiser.get_scalings": "self, sigma",
        "KarrasDenoiser.get_scalings_for_boundary_condition": "self, sigma",
        "KarrasDenoiser.training_losses": "self, model, x_start, sigmas, model_kwargs=None, noise=None",
        "KarrasDenoiser.consistency_losses": "self, model, x_start, num_scales, model_kwargs=None, "
        "target_model=None, teacher_model=None, teacher_diffusion=None, noise=None",
        "KarrasDenoiser.progdist_losses": "self, model, x_start, num_scales, model_kwargs=None, "
        "teacher_model=None, teacher_diffusion=None, noise=None",
        "KarrasDenoiser.denoise": "self, model, x_t, sigmas, **model_kwargs",
        "karras_sample": "diffusion, model, shape, steps, clip_denoised=True, progress=False, callback=None, "
        "model_kwargs=None, device=None, sigma_min=0.002, sigma_max=80, rho=7.0, sampler='heun', s_churn=0.0, "
        "s_tmin=0.0, s_tmax=float('inf'), s_noise=1.0, generator=None, ts=None",
        "get_sigmas_karras": "n, sigma_min, sigma_max, rho=7.0, device='cpu'",
        "to_d": "x, sigma, denoised",
        "get_ancestral_step": "sigma_from, sigma_to",
        "sample_euler_ancestral": "model, x, sigmas, generator, progress=False, callback=None",
        "sample_midpoint_ancestral": "model, x, ts, generator, progress=False, callback=None",
        "sample_heun": "denoiser, x, sigmas, generator, progress=False, callback=None, s_churn=0.0, s_tmin=0.0, "
        "s_tmax=float('inf'), s_noise=1.0",
        "sample_euler": "denoiser, x, sigmas, generator, progress=False, callback=None",
        "sample_dpm": "denoiser, x, sigmas, generator, progress=False, callback=None, s_churn=0.0, s_tmin=0.0, "
        "s_tmax=float('inf'), s_noise=1.0",
        "sample_onestep": "distiller, x, sigmas, generator=None, progress=False, callback=None",
        "stochastic_iterative_sampler": "distiller, x, sigmas, generator, ts, progress=False, callback=None, "
        "t_min=0.002, t_max=80.0, rho=7.0, steps=40",
        "sample_progdist": "denoiser, x, sigmas, generator=None, progress=False, callback=None",
        "iterative_colorization": "distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None",
        "iterative_inpainting": "distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None",
        "iterative_superres": "distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None",
    },
    "nn": {
        "SiLU.forward": "self, x",
        "GroupNorm32.forward": "self, x",
        "conv_nd": "dims, *args, **kwargs",
        "linear": "*args, **kwargs",
        "avg_pool_nd": "dims, *args, **kwargs",
        "update_ema": "target_params, source_params, rate=0.99",
        "zero_module": "module",
        "scale_module": "module, scale",
        "mean_flat": "tensor",
        "append_dims": "x, target_dims",
        "append_zero": "x",
        "normalization": "channels",
        "timestep_embedding": "timesteps, dim, max_period=10000",
        "checkpoint": "func, inputs, params, flag",
        "CheckpointFunction.forward": "ctx, run_function, length, *args",
        "CheckpointFunction.backward": "ctx, *output_grads",
    },
    "fp16_util": {
        "INITIAL_LOG_LOSS_SCALE": None,
        "convert_module_to_f16": "l",
        "convert_module_to_f32": "l",
        "make_master_params": "param_groups_and_shapes",
        "model_grads_to_master_grads": "param_groups_and_shapes, master_params",
        "master_params_to_model_params": "param_groups_and_shapes, master_params",
        "unflatten_master_params": "param_group, master_param",
        "get_param_groups_and_shapes": "named_model_params",
        "master_params_to_state_dict": "model, param_groups_and_shapes, master_params, use_fp16",
        "state_dict_to_master_params": "model, state_dict, use_fp16",
        "zero_master_grads": "master_params",
        "zero_grad": "model_params",
        "param_grad_or_zeros": "param",
        "MixedPrecisionTrainer.__init__": "self, *, model, use_fp16=False, fp16_scale_growth=0.001, "
        "initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE",
        "MixedPrecisionTrainer.zero_grad": "self",
        "MixedPrecisionTrainer.backward": "self, loss",
        "MixedPrecisionTrainer.optimize": "self, opt",
        "MixedPrecisionTrainer.master_params_to_state_dict": "self, master_params",
        "MixedPrecisionTrainer.state_dict_to_master_params": "self, state_dict",
        "check_overflow": "value",
    },
    "resample": {
        "create_named_schedule_sampler": "name, diffusion",
        "ScheduleSampler.weights": "self",
        "ScheduleSampler.sample": "self, batch_size, device",
        "UniformSampler.__init__": "self, diffusion",
        "UniformSampler.weights": "self",
        "LossAwareSampler.update_with_local_losses": "self, local_ts, local_losses",
        "LossAwareSampler.update_with_all_losses": "self, ts, losses",
        "LossSecondMomentResampler.__init__": "self, diffusion, history_per_term=10, uniform_prob=0.001",
        "LossSecondMomentResampler.weights": "self",
        "LossSecondMomentResampler.update_with_all_losses": "self, ts, losses",
        "LogNormalSampler.__init__": "self, p_mean=-1.2, p_std=1.2, even=False",
        "LogNormalSampler.sample": "self, bs, device",
    },
    "random_util": {
        "get_generator": "generator, num_samples=0, seed=0",
        "DummyGenerator.randn": "self, *args, **kwargs",
        "DummyGenerator.randint": "self, *args, **kwargs",
        "DummyGenerator.randn_like": "self, *args, **kwargs",
        **{
            f"{cls}.{method}": sig
            for cls in ("DeterministicGenerator", "DeterministicIndividualGenerator")
            for method, sig in {
                "__init__": "self, num_samples, seed=0",
                "get_generator": "self, device",
                "randn": "self, *size, dtype=th.float, device='cpu'",
                "randint": "self, low, high, size, dtype=th.long, device='cpu'",
                "randn_like": "self, tensor",
                "set_done_samples": "self, done_samples",
                "get_seed": "self",
                "set_seed": "self, seed",
            }.items()
        },
        "DeterministicGenerator.get_global_size_and_indices": "self, size",
        "DeterministicIndividualGenerator.get_size_and_indices": "self, size",
    },
    "image_datasets": {
        "load_data": "*, data_dir, batch_size, image_size, class_cond=False, deterministic=False, "
        "random_crop=False, random_flip=True",
        "ImageDataset.__init__": "self, resolution, image_paths, classes=None, shard=0, num_shards=1, "
        "random_crop=False, random_flip=True",
        "ImageDataset.__len__": "self",
        "ImageDataset.__getitem__": "self, idx",
        "center_crop_arr": "pil_image, image_size",
        "random_crop_arr": "pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0",
    },
    "unet": {
        "AttentionPool2d.__init__": "self, spacial_dim, embed_dim, num_heads_channels, output_dim=None",
        "AttentionPool2d.forward": "self, x",
        "TimestepBlock.forward": "self, x, emb",
        "TimestepEmbedSequential.forward": "self, x, emb",
        "Upsample.__init__": "self, channels, use_conv, dims=2, out_channels=None",
        "Upsample.forward": "self, x",
        "Downsample.__init__": "self, channels, use_conv, dims=2, out_channels=None",
        "Downsample.forward": "self, x",
        "ResBlock.__init__": "self, channels, emb_channels, dropout, out_channels=None, use_conv=False, "
        "use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False",
        "ResBlock.forward": "self, x, emb",
        "AttentionBlock.__init__": "self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, "
        "attention_type='flash', encoder_channels=None, dims=2, channels_last=False, use_new_attention_order=False",
        "AttentionBlock.forward": "self, x, encoder_out=None",
        "QKVFlashAttention.__init__": "self, embed_dim, num_heads, batch_first=True, attention_dropout=0.0, "
        "causal=False, device=None, dtype=None, **kwargs",
        "QKVFlashAttention.forward": "self, qkv, attn_mask=None, key_padding_mask=None, need_weights=False",
        "count_flops_attn": "model, _x, y",
        "QKVAttentionLegacy.__init__": "self, n_heads",
        "QKVAttentionLegacy.forward": "self, qkv",
        "QKVAttentionLegacy.count_flops": "model, _x, y",
        "QKVAttention.__init__": "self, n_heads",
        "QKVAttention.forward": "self, qkv, encoder_kv=None",
        "QKVAttention.count_flops": "model, _x, y",
        "UNetModel.__init__": "self, image_size, in_channels, model_channels, out_channels, num_res_blocks, "
        "attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, "
        "num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, "
        "num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False",
        "UNetModel.convert_to_fp16": "self",
        "UNetModel.convert_to_fp32": "self",
        "UNetModel.forward": "self, x, timesteps, y=None",
    },
    "dist_util": {
        "GPUS_PER_NODE": None,
        "SETUP_RETRY_COUNT": None,
        "setup_dist": "",
        "dev": "",
        "load_state_dict": "path, **kwargs",
        "sync_params": "params",
    },
    "logger": {
        **{name: None for name in ("DEBUG", "INFO", "WARN", "ERROR", "DISABLED", "record_tabular", "dump_tabular")},
        "KVWriter.writekvs": "self, kvs",
        "SeqWriter.writeseq": "self, seq",
        "HumanOutputFormat.__init__": "self, filename_or_file",
        "HumanOutputFormat.writekvs": "self, kvs",
        "HumanOutputFormat.writeseq": "self, seq",
        "HumanOutputFormat.close": "self",
        "JSONOutputFormat.__init__": "self, filename",
        "JSONOutputFormat.writekvs": "self, kvs",
        "JSONOutputFormat.close": "self",
        "CSVOutputFormat.__init__": "self, filename",
        "CSVOutputFormat.writekvs": "self, kvs",
        "CSVOutputFormat.close": "self",
        "TensorBoardOutputFormat.__init__": "self, dir",
        "TensorBoardOutputFormat.writekvs": "self, kvs",
        "TensorBoardOutputFormat.close": "self",
        "make_output_format": "format, ev_dir, log_suffix=''",
        "logkv": "key, val",
        "logkv_mean": "key, val",
        "logkvs": "d",
        "dumpkvs": "",
        "getkvs": "",
        "log": "*args, level=INFO",
        "debug": "*args",
        "info": "*args",
        "warn": "*args",
        "error": "*args",
        "set_level": "level",
        "set_comm": "comm",
        "get_dir": "",
        "profile_kv": "scopename",
        "profile": "n",
        "get_current": "",
        "Logger.__init__": "self, dir, output_formats, comm=None",
        "Logger.logkv": "self, key, val",
        "Logger.logkv_mean": "self, key, val",
        "Logger.dumpkvs": "self",
        "Logger.log": "self, *args, level=INFO",
        "Logger.set_level": "self, level",
        "Logger.set_comm": "self, comm",
        "Logger.get_dir": "self",
        "Logger.close": "self",
        "get_rank_without_mpi_import": "",
        "mpi_weighted_mean": "comm, local_name2valcount",
        "configure": "dir=None, format_strs=None, comm=None, log_suffix=''",
        "reset": "",
        "scoped_configure": "dir=None, format_strs=None, comm=None",
    },
    "losses": {
        "normal_kl": "mean1, logvar1, mean2, logvar2",
        "approx_standard_normal_cdf": "x",
        "discretized_gaussian_log_likelihood": "x, *, means, log_scales",
    },
}

# optional arguments whose default here differs from the reference's, and why (none so far)
DEFAULT_DIFFERENCES = {}

# positional arguments named differently here, and why
NAME_DIFFERENCES = {
    # the reference's one-letter `l`; both are called positionally, through nn.Module.apply
    "fp16_util.convert_module_to_f16": {"l": "module"},
    "fp16_util.convert_module_to_f32": {"l": "module"},
}

P = inspect.Parameter


def reference_signature(params):
    namespace = {"th": torch, "INFO": 20, "INITIAL_LOG_LOSS_SCALE": 20.0}
    exec(f"def reference({params}): pass", namespace)
    return inspect.signature(namespace["reference"])


def resolve(module, dotted):
    obj = importlib.import_module(f"cm.{module}")
    for part in dotted.split("."):
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
    return obj


def incompatibilities(ours, ref):
    """Ways a call that the reference signature accepts could fail against ours (empty when compatible)."""
    problems = []
    mine = list(ours.parameters.values())
    var_pos = any(p.kind == P.VAR_POSITIONAL for p in mine)
    var_kw = any(p.kind == P.VAR_KEYWORD for p in mine)
    positional = [p for p in mine if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in mine if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    matched = set()
    ref_positional = [p for p in ref.parameters.values() if p.kind == P.POSITIONAL_OR_KEYWORD]
    for i, r in enumerate(ref_positional):
        if i < len(positional):
            p = positional[i]
            if p.name != r.name and not var_kw:
                problems.append(f"argument {i} is {p.name!r} here, {r.name!r} in the reference")
            if r.default is not P.empty and p.default is P.empty:
                problems.append(f"{p.name!r} is optional in the reference but required here")
            matched.add(p.name)
        elif not var_pos:
            problems.append(f"reference argument {r.name!r} (position {i}) is not accepted")
    for r in ref.parameters.values():
        if r.kind == P.KEYWORD_ONLY:
            p = by_name.get(r.name)
            if p is None and not var_kw:
                problems.append(f"keyword {r.name!r} is not accepted")
            elif p is not None:
                matched.add(p.name)
                if r.default is not P.empty and p.default is P.empty:
                    problems.append(f"{r.name!r} is optional in the reference but required here")
        elif r.kind == P.VAR_POSITIONAL and not var_pos:
            problems.append("the reference takes *args, this does not")
        elif r.kind == P.VAR_KEYWORD and not var_kw:
            problems.append("the reference takes **kwargs, this does not")
    for p in mine:
        if p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) or p.name in matched:
            continue
        if p.default is P.empty:
            problems.append(f"{p.name!r} is required here and not an argument of the reference")
    return problems


def different_defaults(ours, ref):
    out = []
    for r in ref.parameters.values():
        p = ours.parameters.get(r.name)
        if p is None or r.default is P.empty or p.default is P.empty:
            continue
        same = r.default == p.default or (isinstance(r.default, float) and math.isnan(r.default) and math.isnan(p.default))
        if not same:
            out.append(f"{r.name}: reference {r.default!r}, here {p.default!r}")
    return out


CASES = [(module, name, params) for module, names in REFERENCE.items() for name, params in names.items()]


@pytest.mark.parametrize("module, name, params", CASES, ids=[f"{m}.{n}" for m, n, _ in CASES])
def test_reference_name_imports_and_accepts_the_reference_arguments(module, name, params):
    obj = resolve(module, name)
    if params is None:
        return
    renamed = NAME_DIFFERENCES.get(f"{module}.{name}", {})
    for ref_name, our_name in renamed.items():
        params = re.sub(rf"\b{ref_name}\b", our_name, params)
    ours, ref = inspect.signature(obj), reference_signature(params)
    assert not incompatibilities(ours, ref), incompatibilities(ours, ref)
    allowed = DEFAULT_DIFFERENCES.get(f"{module}.{name}", [])
    assert [d for d in different_defaults(ours, ref) if d.split(":")[0] not in allowed] == []


def test_the_checker_catches_incompatible_signatures():
    def renamed(denoiser, x):
        pass

    def extra_required(x, y):
        pass

    def no_kwargs(x):
        pass

    assert incompatibilities(inspect.signature(renamed), reference_signature("model, x"))
    assert incompatibilities(inspect.signature(extra_required), reference_signature("x"))
    assert incompatibilities(inspect.signature(no_kwargs), reference_signature("x, **kwargs"))
    assert not incompatibilities(inspect.signature(no_kwargs), reference_signature("x"))


# ----- tiny calls under the reference's argument names ---------------------------------------------------


def test_karras_diffusion_sampling_names_run_with_reference_keywords():
    from cm import karras_diffusion as kd
    from cm.random_util import get_generator

    sigmas = kd.get_sigmas_karras(5, 0.002, 80.0)
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    expect = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(sigmas[:-1], expect, rtol=1e-12) and sigmas[-1] == 0
    down, up = kd.get_ancestral_step(2.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    shrink = lambda x, s: x / 2  # noqa: E731
    x = torch.ones(2, 1, 2, 2)
    assert torch.equal(kd.to_d(x, torch.full((2,), 2.0), shrink(x, None)), torch.full_like(x, 0.25))
    assert torch.equal(kd.sample_onestep(distiller=shrink, x=x, sigmas=sigmas), x / 2)
    out = kd.stochastic_iterative_sampler(distiller=shrink, x=x, sigmas=None, generator=get_generator("dummy"),
                                          ts=(0, 4), steps=5)
    assert torch.equal(out, x / 2)  # the last level is sigma_min: no noise
    out = kd.sample_euler_ancestral(model=shrink, x=x, sigmas=sigmas, generator=get_generator("determ", 2, 0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sample_midpoint_ancestral_is_the_midpoint_rule():
    from cm.karras_diffusion import sample_midpoint_ancestral

    # dx/dt = -x over t in [0, 1) with 10 midpoint steps: x(1) ~ e^-1, local factor 1 - h + h^2 / 2
    x = torch.ones(1, 1)
    out = sample_midpoint_ancestral(lambda x, t: -x, x, ts=[i / 10 for i in range(10)], generator=None)
    assert out.item() == pytest.approx((1 - 0.1 + 0.005) ** 10, rel=1e-6)


def _editing_inputs(batch, size):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    x = images + 80.0 * torch.randn(images.shape, generator=g)
    distiller = lambda x, s: torch.tanh(x / (1 + s.view(-1, 1, 1, 1)))  # noqa: E731
    return images, x, distiller


def test_reference_editing_names_keep_the_known_part():
    from cm import karras_diffusion as kd
    from cm.editing import grayscale
    from cm.random_util import get_generator

    kw = dict(ts=(0, 20, 39), generator=get_generator("dummy"))
    images, x, distiller = _editing_inputs(2, 16)
    out, gray = kd.iterative_colorization(distiller, images, x, **kw)
    assert torch.allclose(grayscale(out), grayscale(images), atol=1e-5)
    assert torch.allclose(grayscale(gray), grayscale(images), atol=1e-5)
    out, low = kd.iterative_superres(distiller, images, x, **kw)
    means = torch.nn.functional.avg_pool2d
    assert torch.allclose(means(out, 8), means(images, 8), atol=1e-5)
    assert torch.allclose(low, means(images, 8).repeat_interleave(8, 2).repeat_interleave(8, 3), atol=1e-6)
    images, x, distiller = _editing_inputs(14, 16)
    out, masked = kd.iterative_inpainting(distiller, images, x, **kw)
    keep = kd.reference_letter_mask(14, 16)
    assert torch.allclose(out * keep, images * keep, atol=1e-6)
    assert torch.equal(masked, images * keep - (1 - keep))
    with pytest.raises(ValueError, match="multiple of 7"):
        kd.iterative_inpainting(distiller, images[:3], x[:3], **kw)


def test_fp16_util_master_parameter_helpers_round_trip():
    from cm import fp16_util as fu

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = fu.get_param_groups_and_shapes(model.named_parameters())
    assert [n for n, _ in groups[0][0]] == ["0.bias", "1.bias"] and groups[1][1] == (1, -1)
    masters = fu.make_master_params(groups)
    assert masters[0].shape == (6,) and masters[1].shape == (1, 20) and masters[0].dtype == torch.float32
    model(torch.randn(5, 3)).sum().backward()
    fu.model_grads_to_master_grads(groups, masters)
    assert torch.equal(masters[1].grad[0, :12], model[0].weight.grad.flatten())
    with torch.no_grad():
        for m in masters:
            m.add_(1.0)
    expect = model[1].weight.detach() + 1
    fu.master_params_to_model_params(groups, masters)
    assert torch.equal(model[1].weight, expect)
    state = fu.master_params_to_state_dict(model, groups, masters, use_fp16=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = fu.state_dict_to_master_params(model, state, use_fp16=True)
    assert all(torch.equal(a, b) for a, b in zip(again, masters))
    fu.zero_grad(model.parameters())
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    fu.zero_master_grads(masters)
    assert all(m.grad is None for m in masters)
    assert fu.check_overflow(float("inf")) and fu.check_overflow(float("nan")) and not fu.check_overflow(1.0)


def test_optimize_returns_true_when_the_step_was_taken():
    from cm.fp16_util import MixedPrecisionTrainer

    model = torch.nn.Linear(2, 1)
    trainer = MixedPrecisionTrainer(model=model)
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    trainer.backward(model(torch.ones(1, 2)).sum())
    assert trainer.optimize(opt) and float(trainer.found_inf) == 0.0
    trainer.zero_grad()
    trainer.backward(model(torch.full((1, 2), float("nan"))).sum())
    assert not trainer.optimize(opt) and float(trainer.found_inf) == 1.0


def test_cm_train_loop_has_the_reference_global_step():
    from cm.train_util import CMTrainLoop

    assert isinstance(inspect.getattr_static(CMTrainLoop, "global_step"), property)


def test_nn_checkpoint_function_gives_the_plain_gradients():
    from cm.nn import CheckpointFunction, SiLU

    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    fn = lambda t: SiLU()(lin(t))  # noqa: E731
    fn(x).sum().backward()
    plain = [x.grad.clone()] + [p.grad.clone() for p in lin.parameters()]
    x.grad = None
    lin.zero_grad()
    CheckpointFunction.apply(fn, 1, x, *lin.parameters()).sum().backward()
    got = [x.grad] + [p.grad for p in lin.parameters()]
    assert all(torch.allclose(a, b) for a, b in zip(plain, got))


def test_resample_reference_samplers():
    from cm.karras_diffusion import KarrasDenoiser
    from cm.resample import LogNormalSampler, LossSecondMomentResampler, UniformSampler

    diffusion = KarrasDenoiser()
    assert UniformSampler(diffusion).weights().shape == (diffusion.num_timesteps,)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
    assert np.all(sampler.weights() == 1)
    for _ in range(2):
        sampler.update_with_local_losses(torch.arange(40), torch.arange(40, dtype=torch.float64) + 1)
    w = sampler.weights()
    assert w.argmax() == 39 and w.sum() == pytest.approx(1.0)
    indices, weights = sampler.sample(8, "cpu")
    assert indices.dtype == torch.long and weights.shape == (8,)
    sigmas, _ = LogNormalSampler(even=True).sample(bs=4, device="cpu")
    quantiles = torch.special.ndtr((torch.log(sigmas.double()) + 1.2) / 1.2)
    assert all(k / 4 <= q < (k + 1) / 4 + 1e-6 for k, q in enumerate(quantiles.tolist()))


def test_random_util_reference_helpers():
    from cm.random_util import get_generator

    assert get_generator("dummy").randn_like(torch.zeros(2), dtype=torch.float64).dtype == torch.float64
    g = get_generator("determ", 4, 3)
    size, idx = g.get_global_size_and_indices((2, 5))
    assert size == (4, 5) and idx.tolist() == [0, 1]
    assert isinstance(g.get_generator("cpu"), torch.Generator)
    gi = get_generator("determ-indiv", 4, 3)
    assert gi.get_size_and_indices((2, 5))[0] == (1, 5)
    streams = gi.get_generator("cpu")
    assert len(streams) == 4 and torch.equal(torch.randn(3, generator=streams[2]),
                                             torch.randn(3, generator=torch.Generator().manual_seed(2 + 4 * 3)))


def test_image_dataset_and_crops(tmp_path):
    from PIL import Image

    from cm.image_datasets import ImageDataset, random_crop_arr

    paths = []
    for i in range(3):
        path = tmp_path / f"{i}_img.png"
        Image.fromarray(np.full((12, 20, 3), 60 * i, np.uint8)).save(path)
        paths.append(str(path))
    ds = ImageDataset(8, paths, classes=[0, 1, 2], shard=1, num_shards=2, random_crop=True)
    assert len(ds) == 1
    arr, out = ds[0]
    assert arr.shape == (3, 8, 8) and arr.dtype == np.float32 and out["y"] == 1
    assert np.allclose(arr, 60 / 127.5 - 1)
    assert random_crop_arr(Image.open(paths[0]), 8).shape == (8, 8, 3)


def test_unet_reference_attention_modules():
    from cm import unet

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * 4 * 8, 10, generator=g)
    expect = unet.qkv_attention(qkv, 4, "flash")
    assert torch.allclose(unet.QKVAttentionLegacy(4)(qkv), expect, atol=1e-6)
    assert torch.allclose(unet.QKVAttention(4)(qkv), expect, atol=1e-6)
    flash = unet.QKVFlashAttention(32, 4)
    assert torch.allclose(flash(qkv), expect, atol=1e-6)
    # padded keys (key_padding_mask False) get no weight: attention over the first 7 positions only
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[:, 7:] = False
    q, k, v = unet.split_qkv(qkv, 4, "flash")
    weights = torch.softmax(q @ k[:, :, :7].transpose(-1, -2) / math.sqrt(8), dim=-1)
    by_hand = (weights @ v[:, :, :7]).transpose(-1, -2).reshape(2, 32, 10)
    assert torch.allclose(flash(qkv, key_padding_mask=keep), by_hand, atol=1e-5)
    causal = unet.QKVFlashAttention(32, 4, causal=True)(qkv)
    assert torch.allclose(causal[..., -1], expect[..., -1], atol=1e-5)  # the last position sees everything
    assert not torch.allclose(causal[..., 0], expect[..., 0], atol=1e-3)
    pool = unet.AttentionPool2d(4, 16, 8, output_dim=5)
    assert pool(torch.randn(3, 16, 4, 4)).shape == (3, 5)
    block = unet.AttentionBlock(32, num_head_channels=8, encoder_channels=6)
    assert block(torch.randn(2, 32, 4, 4), encoder_out=torch.randn(2, 6, 3)).shape == (2, 32, 4, 4)

    class Counter:
        total_ops = torch.zeros(1, dtype=torch.float64)

    unet.count_flops_attn(Counter, None, (torch.zeros(2, 8, 4, 4),))
    assert Counter.total_ops.item() == 2 * 2 * 16**2 * 8


def test_logger_reference_functions(tmp_path, monkeypatch):
    from cm import logger

    class FakeComm:
        rank = 0

        def gather(self, obj):
            return [obj, {"a": (4.0, 3), "b": ("text", 1)}]

    with pytest.warns(UserWarning, match="non-float"):
        assert logger.mpi_weighted_mean(FakeComm(), {"a": (0.0, 1)}) == {"a": 3.0}
    with logger.scoped_configure(str(tmp_path), ["json", "csv"]):
        logger.logkvs({"x": 1.5, "y": 2})
        with logger.profile_kv("io"):
            pass
        assert set(logger.getkvs()) == {"x", "y", "wait_io"}
        logger.dumpkvs()
        assert logger.get_dir() == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["progress.csv", "progress.json"]
    assert isinstance(logger.make_output_format("stdout", str(tmp_path)), logger.KVWriter)
    monkeypatch.delenv("PMI_RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    assert logger.get_rank_without_mpi_import() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert logger.get_rank_without_mpi_import() == 3


def test_losses_reference_functions():
    from cm.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl

    assert normal_kl(torch.zeros(3), 0.0, torch.zeros(3), 0.0).abs().max() == 0
    # KL(N(1, 1) || N(0, e^2)) = 0.5 (2 - 0 - 1 + e^-2 + e^-2)
    got = normal_kl(torch.tensor(1.0), 0.0, 0.0, 2.0)
    assert got.item() == pytest.approx(0.5 * (2 - 1 + 2 * math.exp(-2)))
    assert approx_standard_normal_cdf(torch.tensor(0.0)).item() == 0.5
    # the 256 bins of [-1, 1] share all the probability
    values = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(values, means=torch.full((256,), 0.3), log_scales=torch.full((256,), -1.0))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
