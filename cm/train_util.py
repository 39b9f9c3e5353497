"""Training loops: TrainLoop (EDM denoiser) and CMTrainLoop (consistency distillation / training, progressive distillation).

A step reads like this: accumulate gradients over micro-batches (all-reduce only on the last one),
step the optimizer (a step with non-finite gradients is skipped), update the EMAs, update the target
network, log, checkpoint. Nothing in a step waits for the device except with optimizers that have
no fused kernel (RAdam), which must read the skip decision.

Checkpoints keep the reference's file names in the log dir (modelNNNNNN.pt, ema_RATE_NNNNNN.pt,
optNNNNNN.pt, target_modelNNNNNN.pt, teacher_modelNNNNNN.pt) plus stateNNNNNN.pt with everything else a
resumed run needs (RNG states of every rank, data position, loss scale, configuration). Files are
written to a temporary name and renamed, the model file last; a restart resumes from the newest step
whose files are all present. A write that fails (disk full) removes its step's files and stops every
rank with one line; temporary files of a killed process are removed at the next checkpoint.
"""

import math
import time

import blobfile as bf
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from . import distributed_checkpoint as sharded_checkpoint
from .checkpoint_io import (  # noqa: F401  (find_ema_checkpoint, parse_resume_step_from_filename: the reference's)
    CHECKPOINT_FORMATS,
    atomic_save,
    checkpoint_files,
    checkpoint_format_of,
    find_ema_checkpoint,
    load_fitting_state_dict,
    network_file,
    parse_resume_step_from_filename,
    remove_files,
    remove_stale_temporaries,
    resume_point,
)
from .checkpoint_io import find_resume_checkpoint as find_checkpoint_in
from .checkpoint_choice import check_every_rank_can_read, chosen_on_rank0, resume_files
from .errors import CheckpointError, CheckpointWriteError, first_line as first_line_of
from .flags import OPTIMIZERS
from .guidance import drop_labels, null_label
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer  # noqa: F401  (the reference's location)
from .nn import update_ema
from .random_util import DeviceRNG
from .resample import LogNormalSampler
from .retention import check_keep, prune_checkpoint_files
from .sample_rng import SampleRNG
from .sharding import PARALLEL, drop_gathered, gather_full, shard_like, shard_network
from .stop_request import NO_STOP, PREEMPTED, StopRequest, preempt_signal_number, requeue_slurm_job, stop_message
from .modes.base import LossContext
from .modes.consistency import named_schedule
from .modes.edm import bind_edm_loss
from .time_budget import TimeBudget, planned_lengths, run_length
from .training_modes import get_training_mode



# ----- small pieces ----------------------------------------------------------------------------


def make_optimizer(name, params, lr, weight_decay, betas=(0.9, 0.999)):
    """RAdam (the reference's), Adam or AdamW; Adam and AdamW use the fused kernel (no host sync on skips)."""
    params = list(params)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def parse_betas(text):
    """'0.9,0.95' -> (0.9, 0.95): the optimizer's beta1, beta2, each in [0, 1)."""
    try:
        betas = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"--adam_betas must be two numbers in [0, 1) like 0.9,0.999, got {text!r}")
    return betas


def parse_ema_rates(ema_rate):
    """'0.999,0.9999' or a float -> [0.999, 0.9999]."""
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    rates = [float(x) for x in str(ema_rate).split(",") if x.strip()]
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"EMA rates must lie in [0, 1), got {bad}")
    return rates


def sigma_quartile(sigmas, sigma_min, sigma_max):
    """Index 0..3 of sigma's quarter of [log sigma_min, log sigma_max] (for per-quartile loss logs)."""
    frac = (torch.log(sigmas) - math.log(sigma_min)) / math.log(sigma_max / sigma_min)
    return (4 * frac).floor().clamp(0, 3).long()


def log_loss_dict(diffusion, ts, losses):
    """Log the mean of every loss term and its mean per quartile of log sigma (keys like loss_q0), on the device.

    :param ts: the noise level sigma of each sample (the reference's name).
    """
    quartile = sigma_quartile(ts.detach().float(), diffusion.sigma_min, diffusion.sigma_max)
    counts = torch.bincount(quartile, minlength=4).float()
    divisors = counts.clamp(min=1)
    for key, values in losses.items():
        values = values.detach().float()
        logger.logkv_mean(key, values.mean())
        means = torch.zeros(4, device=values.device).index_add_(0, quartile, values) / divisors
        for q in range(4):
            logger.logkv_mean(f"{key}_q{q}", means[q], counts[q])


def skip_aware_rate(rate, found_inf):
    """EMA rate for a step: `rate`, or 1 (the average stays) when the step was skipped (found_inf = 1)."""
    return rate + (1 - rate) * found_inf


def get_blob_logdir():
    """Where checkpoints go: the logger's directory."""
    return logger.get_dir()


def find_resume_checkpoint(log_dir=None, ema_rates=(), extra_names=()):
    """The newest complete checkpoint's model file in log_dir (default: the logger's directory), else None."""
    return find_checkpoint_in(log_dir or get_blob_logdir(), ema_rates, extra_names)


# ----- the EDM loop ----------------------------------------------------------------------------


class TrainLoop:
    """EDM denoiser training (and the machinery CMTrainLoop reuses).

    :param model: the network (already on the device).
    :param diffusion: its KarrasDenoiser.
    :param data: iterator of (images, cond) batches; resumable when it has state_dict / load_state_dict.
    :param batch_size: images per step on this rank.
    :param microbatch: images per forward/backward (-1 or 0: the whole batch); gradients are averaged.
    :param lr: learning rate.
    :param ema_rate: comma list (or float) of EMA decays of the saved EMA models.
    :param log_interval: steps between log dumps.
    :param save_interval: steps between checkpoints (-1: only at the end).
    :param resume_checkpoint: a modelNNNNNN.pt to start from when the log dir has no checkpoint.
    :param use_fp16: float16 autocast with dynamic loss scaling.
    :param fp16_scale_growth: lg_loss_scale increase per good fp16 step.
    :param schedule_sampler: sigma sampler for the EDM loss (default lognormal P_mean -1.2, P_std 1.2).
    :param weight_decay: optimizer weight decay.
    :param adam_betas: the optimizer's "beta1,beta2" (default 0.9,0.999).
    :param lr_anneal_steps: linearly anneal lr to 0 over this many steps (0: constant).
    :param lr_warmup_steps: raise lr linearly from lr / lr_warmup_steps to lr over the first steps (0: none).
    :param use_bf16: bfloat16 autocast.
    :param optimizer: radam (reference) | adam | adamw.
    :param total_training_steps: stop after this many steps (0: run until interrupted).
    :param run_config: dict recorded in every checkpoint (the resolved configuration, cm.config).
    :param seed: the run's seed (restarts the RNG streams when a checkpoint of another world size is resumed).
    :param checkpoint_format: "pt" (the reference's files) or "safetensors" for the model, EMA and *_model files.
    :param max_consecutive_skips: stop with an error after this many steps in a row with non-finite gradients.
    :param channels_last: feed images in channels_last memory format.
    :param time_limit: seconds of training after which to checkpoint and stop (0: none).
    :param time_budget: seconds of training to fit the run into (0: none): from its measured speed the run re-plans
        its length, lr decay and schedules so that it ends on time (cm.time_budget).
    :param progress: tqdm progress bar on rank 0.
    :param class_dropout_prob: classifier-free guidance: each label becomes the model's null label with this
        probability (cm.guidance; the model needs null_class).
    :param parallel: "ddp" (every rank holds whole networks; the reference's) or "fsdp": the networks are sharded
        over the ranks (cm.sharding) and checkpoints are distributed (shardedNNNNNN/, cm.distributed_checkpoint),
        with the reference's single files gathered every full_checkpoint_interval steps.
    :param full_checkpoint_interval: with fsdp, steps between the gathered single files (modelNNNNNN.pt,
        ema_RATE_NNNNNN.pt, ...; 0: at every checkpoint; they are always written at the end of the run).
    :param async_checkpoint: with fsdp, write distributed checkpoints in the background while training goes on.
    :param preempt_signal: "USR1" | "USR2" | "none": the pre-emption warning signal, which checkpoints and stops
        like SIGTERM (cm.stop_request).
    :param requeue: after a pre-emption warning's checkpoint, rank 0 runs scontrol requeue $SLURM_JOB_ID.
    :param keep_checkpoints: keep the newest K >= 2 complete checkpoints, deleting older ones (0: keep all;
        cm.retention).
    :param sample_indexed_rng: draw the loss's randomness by (seed, step, global sample) (cm.sample_rng), so the run
        continues the same way on another number of ranks; False: each rank's own RNG stream; None: as run_config's
        run.sample_indexed_rng says (the training scripts: --sample_indexed_rng, default true), else False.
    """

    @property
    def extra_checkpoint_names(self):
        """File prefixes of the extra networks in a checkpoint (from _extra_checkpoints)."""
        return tuple(name for name, _ in self._extra_checkpoints())

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        adam_betas="0.9,0.999",
        lr_anneal_steps=0,
        lr_warmup_steps=0,
        use_bf16=False,
        optimizer="radam",
        total_training_steps=0,
        run_config=None,
        seed=0,
        checkpoint_format="pt",
        max_consecutive_skips=100,
        channels_last=True,
        time_limit=0.0,
        time_budget=0.0,
        progress=True,
        class_dropout_prob=0.0,
        parallel="ddp",
        full_checkpoint_interval=0,
        async_checkpoint=False,
        preempt_signal="USR1",
        requeue=False,
        keep_checkpoints=0,
        sample_indexed_rng=None,
    ):
        if parallel not in PARALLEL:
            raise ValueError(f"unknown parallel {parallel!r}; allowed: {', '.join(PARALLEL)}")
        if async_checkpoint and parallel != "fsdp":
            raise ValueError("--async_checkpoint writes distributed checkpoints: use it with --parallel fsdp")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.schedule_sampler = schedule_sampler or LogNormalSampler()
        self.weight_decay = weight_decay
        self.betas = parse_betas(adam_betas)
        self.lr_anneal_steps = lr_anneal_steps
        self.lr_warmup_steps = lr_warmup_steps
        self.optimizer_name = optimizer
        self.total_training_steps = total_training_steps
        self.run_config = run_config or {}
        self.seed = seed
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; allowed: {', '.join(CHECKPOINT_FORMATS)}")
        self.checkpoint_format = checkpoint_format
        self.max_consecutive_skips = max_consecutive_skips
        self.channels_last = channels_last
        self.time_limit = time_limit
        self.configured_steps = (total_training_steps, lr_anneal_steps)  # what a time budget re-plans
        self.budget = TimeBudget(time_budget) if time_budget else None
        self.progress = progress
        self.class_dropout_prob = class_dropout_prob
        self.parallel = parallel
        self.sharded = parallel == "fsdp" and dist_util.get_world_size() > 1
        self.full_checkpoint_interval = full_checkpoint_interval
        self.checkpointer = sharded_checkpoint.Checkpointer(async_checkpoint) if parallel == "fsdp" else None
        self.preempt_signal, self.requeue = preempt_signal_number(preempt_signal), requeue
        check_keep(keep_checkpoints)
        self.keep_checkpoints = keep_checkpoints
        self.null_label = null_label(model) if class_dropout_prob > 0 else None
        self.device = dist_util.dev()
        self.global_batch = batch_size * dist_util.get_world_size()
        if sample_indexed_rng is None:
            sample_indexed_rng = bool(self.run_config.get("run", {}).get("sample_indexed_rng", False))
        self.sample_rng = SampleRNG(sample_indexed_rng, seed, self.global_batch, dist_util.get_rank() * batch_size)
        self.step = 0
        self.last_saved_step = -1
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)

        dist_util.sync_params(self.model.parameters())
        dist_util.sync_params(self.model.buffers())
        if self.sharded:
            self._shard_networks(torch.bfloat16 if use_bf16 and not self._needs_fp32_weights() else None)
        self.mp_trainer = MixedPrecisionTrainer(
            model=model, use_fp16=use_fp16, use_bf16=use_bf16, fp16_scale_growth=fp16_scale_growth
        )
        self.opt = make_optimizer(optimizer, self.mp_trainer.master_params, lr, weight_decay, self.betas)
        self.ema_params = [[p.detach().clone() for p in self.mp_trainer.master_params] for _ in self.ema_rate]
        self.skip_run = torch.zeros((), device=self.device)
        self.schedule_values = {}  # the named values of the mode's schedule at this step (CMTrainLoop)
        self.loss_fn = self._bind_loss()
        self._resume()
        self.resumed_step = self.step if self.last_saved_step >= 0 else None  # never deleted by keep_checkpoints
        self._anneal_lr()  # the learning rate of the first step (warm-up, or where a resumed run was)

        if dist_util.get_world_size() > 1 and not self.sharded:
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                bucket_cap_mb=128,
                gradient_as_bucket_view=True,
                find_unused_parameters=False,
            )
        else:
            self.ddp_model = self.model

    # ----- sharding (--parallel fsdp) -------------------------------------------------------------
    def _shard_networks(self, param_dtype):
        """Shard the model and the networks of _networks_to_shard() in place (cm.sharding)."""
        for network in [self.model, *self._networks_to_shard()]:
            shard_network(network, param_dtype)
        logger.log(f"fsdp: networks sharded over {dist_util.get_world_size()} ranks"
                   + (" (bfloat16 weights in the forward pass)" if param_dtype is not None else ""))

    def _networks_to_shard(self):
        """Hook: the networks besides the model that fsdp shards (CMTrainLoop: target and teacher)."""
        return []

    def _needs_fp32_weights(self):
        """Hook: whether the loss takes a JVP, which keeps float32 weights under fsdp (CMTrainLoop)."""
        return False

    def _load_network(self, module, state_dict, path):
        """Load a whole-tensor state dict read from a file into `module`, sharded or not."""
        if self.sharded:
            own = module.state_dict()
            state_dict = {k: shard_like(v, own[k]) if k in own else v for k, v in state_dict.items()}
        load_fitting_state_dict(module, state_dict, path)

    def _load_optimizer_file(self, state_dict):
        """An optimizer state saved from whole parameters (optNNNNNN.pt), split as this run's parameters are."""
        if self.sharded:
            params = self.mp_trainer.master_params
            state_dict = {**state_dict, "state": {
                index: {k: shard_like(v, params[index]) if torch.is_tensor(v) and v.shape == params[index].shape
                        else v for k, v in values.items()}
                for index, values in state_dict["state"].items()}}
        self.opt.load_state_dict(state_dict)

    # ----- resume ------------------------------------------------------------------------------
    def _resume(self):
        # rank 0 chooses for every rank (cm.checkpoint_choice), and every rank must read the chosen files
        point = chosen_on_rank0(lambda: resume_point(get_blob_logdir(), self.ema_rate, self.extra_checkpoint_names))
        if point is not None and bf.basename(point[1]).startswith("sharded"):
            self._resume_sharded(*point)
            return
        if point is None and self.resume_checkpoint and bf.isdir(self.resume_checkpoint):
            self._resume_sharded(sharded_checkpoint.step_of(self.resume_checkpoint), self.resume_checkpoint)
            return
        found = point[1] if point else None
        path = found or self.resume_checkpoint
        if not path:
            logger.log("starting from step 0")
            return
        self.step = parse_resume_step_from_filename(path)
        directory = bf.dirname(path)
        logger.log(f"resuming from {path} (step {self.step})")
        names = checkpoint_files(self.step, self.ema_rate, self.extra_checkpoint_names, checkpoint_format_of(path))
        check_every_rank_can_read(*resume_files(path, found, names))
        try:
            self._load_network(self.model, dist_util.load_state_dict(path, map_location=self.device), path)
            for rate, params in zip(self.ema_rate, self.ema_params):
                ema_path = find_ema_checkpoint(path, self.step, rate)
                source = dist_util.load_state_dict(ema_path, map_location=self.device) if ema_path else None
                if source is None:
                    update_ema(params, self.mp_trainer.master_params, rate=0.0)
                    continue
                values = self.mp_trainer.state_dict_to_master_params(source)
                update_ema(params, [shard_like(v.to(self.device), p) for v, p in zip(values, params)], rate=0.0)
            opt_path = bf.join(directory, f"opt{self.step:06d}.pt")
            if bf.exists(opt_path):
                self._load_optimizer_file(dist_util.load_state_dict(opt_path, map_location=self.device))
            self._load_extra_checkpoints(directory, self.step, checkpoint_format_of(path))
            state_path = bf.join(directory, f"state{self.step:06d}.pt")
            if bf.exists(state_path):
                self._load_state(dist_util.load_state_dict(state_path, map_location="cpu"))
            else:
                logger.log(f"{state_path} not found: RNG and data order restart (the run continues, not bit-exactly)")
        except CheckpointError as e:
            if not found:
                raise
            raise CheckpointError(
                f"{e}; to resume from the checkpoint before it, move the files of step {self.step} out of {directory}"
            ) from None
        self.last_saved_step = self.step

    def _resume_sharded(self, step, path):
        """Resume from the distributed checkpoint of `step` (the folder `path` and stateNNNNNN.pt beside it), at any
        number of ranks, sharded or not."""
        directory = bf.dirname(path)
        logger.log(f"resuming from {path} (step {step})")
        state_path = bf.join(directory, f"state{step:06d}.pt")
        objects = [bf.join(directory, f"{name}{step:06d}.pt") for name, module in self._extra_checkpoints()
                   if not isinstance(module, torch.nn.Module)]
        check_every_rank_can_read([bf.join(path, sharded_checkpoint.METADATA), state_path, *objects])
        state = self._sharded_state()
        sharded_checkpoint.load(state, path)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"])
        for name, module in self._extra_checkpoints():
            if isinstance(module, torch.nn.Module):
                set_model_state_dict(module, state[name])
            else:
                module.load_state_dict(dist_util.load_state_dict(bf.join(directory, f"{name}{step:06d}.pt"),
                                                                 map_location=self.device))
        self.step = step
        self._load_state(dist_util.load_state_dict(state_path, map_location="cpu"))
        self.last_saved_step = step

    def _sharded_state(self):
        """What a distributed checkpoint holds: model, optimizer, EMAs and the extra networks (their tensors are the
        live ones, sharded under fsdp: loading fills them in place). Other state a loss owns (UFOGen's
        discriminator optimizer), the same on every rank, goes to its own file beside stateNNNNNN.pt."""
        for _, module in self._extra_checkpoints():
            drop_gathered(module)  # a network that ran without backward holds its gathered weights
        state = {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model, self.opt)}
        for rate, params in zip(self.ema_rate, self.ema_params):
            state[f"ema_{rate}"] = dict(zip(self.mp_trainer.param_names, params))
        for name, module in self._extra_checkpoints():
            if isinstance(module, torch.nn.Module):
                state[name] = get_model_state_dict(module)
        return state

    def _load_state(self, state):
        self.mp_trainer.lg_loss_scale = state["lg_loss_scale"].to(self.device)
        rngs = state["rng"]
        rank, world = dist_util.get_rank(), dist_util.get_world_size()
        if len(rngs) == world:
            DeviceRNG(self.device).set_state(rngs[rank])
        elif self.sample_rng.enabled:
            logger.log(f"checkpoint was written by {len(rngs)} ranks, this run has {world}: {SampleRNG.RESIZE_NOTE}")
        else:
            logger.log(f"checkpoint was written by {len(rngs)} ranks, this run has {world}: RNG streams restart")
            torch.manual_seed(int(state.get("seed", self.seed)) + 1000 * self.step + rank)
        if hasattr(self.data, "load_state_dict") and "data" in state:
            self.data.load_state_dict(state["data"])
        self._load_plan(state.get("plan"))

    def _load_extra_checkpoints(self, directory, step, fmt="pt"):
        """Hook: CMTrainLoop loads its target / teacher networks here."""

    # ----- the loop -----------------------------------------------------------------------------
    def done(self):
        if self.total_training_steps and self.step >= self.total_training_steps:
            return True
        return bool(self.lr_anneal_steps) and self.step >= self.lr_anneal_steps

    def run_loop(self):
        """Train until total_training_steps (or lr_anneal_steps), or until SIGINT / SIGTERM, the pre-emption warning
        signal, --max_minutes or the time budget says stop; checkpoint at the end. With several ranks every rank
        stops after the same step (cm.stop_request: a signal to any rank during step k stops all after step k + 1);
        after a pre-emption warning with requeue, rank 0 requeues the SLURM job."""
        bar = None
        if self.progress and dist_util.get_rank() == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_training_steps or None, initial=self.step, desc="train", dynamic_ncols=True)
        self._interval_start = (time.time(), self.step)
        deadline = time.time() + self.time_limit if self.time_limit else float("inf")
        if self.budget is not None:
            self.budget.start(self.step, run_length(self.total_training_steps, self.lr_anneal_steps))
        should_stop = NO_STOP
        with StopRequest(self.device, self.preempt_signal) as stop:
            while not self.done():
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                if bar is not None:
                    bar.update(1)
                if self.budget is not None:
                    self._follow_budget(bar)
                out_of_time = time.time() > deadline or self._overran_budget()
                should_stop = stop.agreed(stop.wish(out_of_time))
                if self.step % self.log_interval == 0:
                    self.dump_logs(bar)
                if should_stop:
                    logger.log(stop_message(should_stop, stop.received, out_of_time, self.preempt_signal, self.step))
                    break
                if self.save_interval > 0 and self.step % self.save_interval == 0:
                    self.save()
        if self.step % self.log_interval:
            self.dump_logs(bar)
        if self.last_saved_step != self.step:
            self.save()
        if self.checkpointer is not None:
            self.checkpointer.wait()  # the run ends once its last checkpoint is on disk
        if should_stop == PREEMPTED and self.requeue and dist_util.get_rank() == 0:
            logger.log(requeue_slurm_job())
        if hasattr(self.data, "log_summary"):
            self.data.log_summary()  # unreadable images skipped over the run
        if bar is not None:
            bar.close()
        if self.budget is not None:
            self.budget.stop()

    def run_step(self, batch, cond):
        self.forward_backward(batch, cond)
        self.mp_trainer.optimize(self.opt)
        found_inf = self.mp_trainer.found_inf
        self._update_ema(found_inf)
        self._after_optimize(found_inf)
        self.skip_run = (self.skip_run + found_inf) * found_inf
        self.step += 1
        self._anneal_lr()
        self.log_step(found_inf)

    def _after_optimize(self, found_inf):
        """Hook: CMTrainLoop updates its target network here."""

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch].to(self.device, non_blocking=True)
            if self.channels_last:
                micro = micro.contiguous(memory_format=torch.channels_last)
            micro_cond = {k: v[i : i + self.microbatch].to(self.device, non_blocking=True) for k, v in cond.items()}
            last = i + self.microbatch >= n
            draws = self.sample_rng.micro_batch(self.step, i, micro.shape[0])  # cm.sample_rng: by global sample
            with draws, dist_util.ddp_sync(self.ddp_model, sync=last):
                micro_cond = self._drop_labels(micro_cond)
                with self.mp_trainer.autocast():
                    losses, weights = self.compute_losses(micro, micro_cond)
                weighted = losses["loss"].float() * weights
                terms = {k: weighted if k == "loss" else v * weights for k, v in losses.items() if k != "sigma"}
                log_loss_dict(self.diffusion, losses["sigma"], terms)
                self.mp_trainer.backward(weighted.mean() * (micro.shape[0] / n))

    def _drop_labels(self, cond):
        """Classifier-free guidance training: labels replaced by the null label with probability class_dropout_prob."""
        if self.null_label is None:
            return cond
        return {**cond, "y": drop_labels(cond["y"], self.class_dropout_prob, self.null_label)}

    def _bind_loss(self):
        """The EDM loss with this loop's noise-level sampler (CMTrainLoop binds its mode's loss instead)."""
        return bind_edm_loss(self.diffusion, LossContext(schedule_sampler=self.schedule_sampler))

    def compute_losses(self, micro, micro_cond):
        """The bound loss on one micro-batch; returns (terms with "loss" and "sigma", per-sample weights)."""
        return self.loss_fn(self.ddp_model, micro, micro_cond, self.schedule_values)

    def _update_ema(self, found_inf):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=skip_aware_rate(rate, found_inf))

    def _anneal_lr(self):
        """lr for the next step: linear warm-up over lr_warmup_steps, linear decay to 0 at lr_anneal_steps."""
        if not (self.lr_anneal_steps or self.lr_warmup_steps):
            return
        lr = self.lr
        if self.lr_warmup_steps:
            lr *= min(1.0, (self.step + 1) / self.lr_warmup_steps)
        if self.lr_anneal_steps:
            lr *= max(0.0, 1 - self.step / self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr

    # ----- time budget (cm.time_budget) -----------------------------------------------------------
    def set_run_length(self, total_training_steps, lr_anneal_steps):
        """Make the run end at total_training_steps with its lr decay over lr_anneal_steps (CMTrainLoop: and
        rebuild its schedule for the new length)."""
        self.total_training_steps, self.lr_anneal_steps = total_training_steps, lr_anneal_steps
        self._anneal_lr()

    def replan(self, total_steps):
        """Re-plan the configured run to end at step total_steps: the lr decay and the schedules scale with it."""
        self.set_run_length(*planned_lengths(*self.configured_steps, total_steps))

    def plan_state(self):
        """A budgeted run's plan, stored in each checkpoint (None without a budget)."""
        if self.budget is None:
            return None
        return {"total_training_steps": self.total_training_steps, "lr_anneal_steps": self.lr_anneal_steps,
                "budget": self.budget.state_dict()}

    def _load_plan(self, plan):
        """Resume a budgeted run's plan: its length and schedules, the time spent and whether the plan is final."""
        if plan is None:
            return
        if self.budget is None:
            logger.log("the checkpoint holds a time-budget plan, but this run has no --time_budget_minutes: "
                       "the flags' step counts apply")
            return
        self.budget.spent, self.budget.final = plan["budget"]["spent"], plan["budget"]["final"]
        self.set_run_length(plan["total_training_steps"], plan["lr_anneal_steps"])
        how = "final" if self.budget.final else "re-planned as it goes"
        logger.log(f"time budget: resuming the plan of {self.total_training_steps} steps ({how}); "
                   f"{self.budget.spent / 60:.2f} of {self.budget.seconds / 60:.2f} min spent")

    def _follow_budget(self, bar):
        """Re-plan when the budget says so; rank 0's measurement decides for every rank, at log steps."""
        if self.budget.final:
            return
        shared = dist_util.get_world_size() > 1
        if shared and self.step % self.log_interval:
            return
        steps = self.budget.plan(self.step) if self.budget.due(self.step) else None
        if shared:
            steps = dist_util.broadcast_object(steps)
        if steps is None:
            return
        self.budget.accept(self.step, steps)
        self.replan(steps)
        if bar is not None:
            bar.total = self.total_training_steps
            bar.refresh()
        speed = f"{self.budget.seconds_per_step:.3f} s/step, " if self.budget.seconds_per_step else ""
        then = "final plan" if self.budget.final else f"next re-plan at step {self.budget.next_check}"
        logger.log(f"time budget: step {self.step}, {speed}{self.budget.elapsed() / 60:.2f} of "
                   f"{self.budget.seconds / 60:.2f} min used -> {self.total_training_steps} steps ({then})")

    def _overran_budget(self):
        return self.budget is not None and self.budget.overrun()

    # ----- logging ------------------------------------------------------------------------------
    def log_step(self, found_inf=None):
        """Log this step's counters (found_inf: 1 when the step was skipped; default the trainer's flag)."""
        found_inf = self.mp_trainer.found_inf if found_inf is None else found_inf
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv_mean("grad_norm", self.mp_trainer.grad_norm)
        logger.logkv_mean("skipped", found_inf)
        if self.mp_trainer.use_fp16:
            logger.logkv_mean("lg_loss_scale", self.mp_trainer.lg_loss_scale)

    def dump_logs(self, bar=None):
        now, start_step = time.time(), self._interval_start[1]
        elapsed = now - self._interval_start[0]
        if self.step > start_step and elapsed > 0:
            logger.logkv("samples_per_sec", (self.step - start_step) * self.global_batch / elapsed)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        skip_run = int(self.skip_run)
        values = logger.dumpkvs()
        self._interval_start = (time.time(), self.step)
        if values.get("skipped", 0) > 0:
            logger.log(
                f"skipped {values['skipped'] * self.log_interval:.0f} of the last {self.log_interval} steps "
                "for non-finite gradients"
                + (f"; lg_loss_scale now {values.get('lg_loss_scale', 0):.3f}" if self.mp_trainer.use_fp16 else "")
            )
        if skip_run >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"gradients were NaN/inf for {skip_run} consecutive steps up to step {self.step}; "
                f"the last checkpoint (step {self.last_saved_step}) is intact - lower the learning rate or check the data"
            )
        if bar is not None and "loss" in values:
            bar.set_postfix(loss=f"{values['loss']:.4g}")

    # ----- checkpoints --------------------------------------------------------------------------
    def save(self):
        """Write the reference's files plus stateNNNNNN.pt atomically (rank 0), the model file last; with fsdp, a
        distributed checkpoint instead (_save_distributed).

        The other ranks wait for the write outside any collective, for up to CM_SAVE_TIMEOUT seconds
        (dist_util.run_on_rank0), so a write slower than CM_DIST_TIMEOUT is not taken for a lost rank. A failed
        write (disk full, quota, permissions) removes this step's files, leaves the previous checkpoint as it
        was and stops every rank at once with one line.
        """
        step = self.step
        rngs = dist_util.all_gather_object(DeviceRNG(self.device).get_state())
        if self.checkpointer is not None:
            self._save_distributed(step, rngs)
        else:
            contents = self._checkpoint_contents(step, rngs)
            dist_util.run_on_rank0(lambda: self._write_checkpoint(step, contents),
                                   f"to write the checkpoint of step {step}")
        self.last_saved_step = step
        if self.keep_checkpoints and dist_util.get_rank() == 0:  # cm.retention
            prune_checkpoint_files(get_blob_logdir(), self.keep_checkpoints, self._checkpoint_file_names,
                                   protected=[self.resumed_step] if self.resumed_step is not None else (),
                                   sharded=self.checkpointer is not None)

    def _checkpoint_file_names(self, step, fmt):
        """The file names of a complete checkpoint of this loop at `step` in format `fmt`."""
        return checkpoint_files(step, self.ema_rate, self.extra_checkpoint_names, fmt)

    def _save_distributed(self, step, rngs):
        """fsdp: stateNNNNNN.pt and the files of a loss's own state (rank 0), then every rank's shards into
        shardedNNNNNN/, whose metadata, written last, completes the step; then, when due, the reference's single
        files gathered on rank 0."""
        state = self._run_state(step, rngs)
        state_files = [(f"{name}{step:06d}.pt", module.state_dict) for name, module in self._extra_checkpoints()
                       if not isinstance(module, torch.nn.Module)]
        state_files.append((f"state{step:06d}.pt", lambda: state))
        dist_util.run_on_rank0(lambda: self._write_checkpoint(step, state_files, "run state"),
                               f"to write the run state of step {step}")
        folder = bf.join(get_blob_logdir(), sharded_checkpoint.sharded_dir_name(step))
        try:
            self.checkpointer.save(self._sharded_state(), folder)
        except Exception as e:  # noqa: BLE001 - DCP gathers every rank's failure into one exception
            raise CheckpointWriteError(
                f"could not write the distributed checkpoint {folder} ({first_line_of(e)}); the last complete "
                f"checkpoint (step {self.last_saved_step}) is intact; free space and rerun the same command to resume"
            ) from None
        if self._full_files_due(step):
            contents = self._gathered_contents(step)
            dist_util.run_on_rank0(lambda: self._write_checkpoint(step, contents, "single files"),
                                   f"to write the single files of step {step}")

    def _full_files_due(self, step):
        """Whether the gathered single files are written at `step` (fsdp): every full_checkpoint_interval steps
        (0: every checkpoint) and at the end of the run."""
        interval = self.full_checkpoint_interval
        return interval <= 0 or step % interval == 0 or self.done()

    def _full_network_state(self, module, params=None):
        """A whole-tensor state dict of `module` on rank 0 (empty elsewhere), its parameters replaced by `params`
        (an EMA, in master_params order) when given. A collective under fsdp: every rank calls it."""
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if params is not None:
            for name, value in zip(self.mp_trainer.param_names, params):
                whole = gather_full(value)
                if dist_util.get_rank() == 0:
                    full[name] = whole
        return full

    def _gathered_contents(self, step):
        """(file name, maker) of the reference's single files of `step` (EMAs, extra networks, the model last),
        gathered from the shards now (every rank takes part). A loss's own non-network state has its file already."""
        names = checkpoint_files(step, self.ema_rate, self.extra_checkpoint_names, self.checkpoint_format)
        networks = [module for _, module in self._extra_checkpoints()]
        states = [self._full_network_state(self.model, params) for params in self.ema_params] + [None, None]
        states += [self._full_network_state(m) if isinstance(m, torch.nn.Module) else None for m in networks]
        states.append(self._full_network_state(self.model))
        return [(name, lambda sd=sd: sd) for name, sd in zip(names, states) if sd is not None]

    def _write_checkpoint(self, step, contents, what="checkpoint"):
        """Rank 0's part of save(): the files of `contents` ((name, maker) pairs, the model file last), each
        fsynced with its folder before the next; on failure none of them stays. The run's lock on the log dir
        (cm.run_dir) makes any temporary file found here a killed process's, so it is removed."""
        directory = get_blob_logdir()
        remove_stale_temporaries(directory)
        written = []
        try:
            for name, make in contents:
                path = bf.join(directory, name)
                written.append(path)
                atomic_save(make(), path)
        except Exception as e:
            remove_files(written)
            if not isinstance(e, OSError):
                raise
            before = f"step {self.last_saved_step}" if self.last_saved_step >= 0 else "no earlier step"
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} ({bf.basename(written[-1])}: {e.strerror or e}); "
                f"its files were removed, the last checkpoint ({before}) is intact; free space in {directory} "
                "and rerun the same command to resume"
            ) from None
        logger.log(f"saved {what} for step {step} in {directory}")

    def _run_state(self, step, rngs):
        """stateNNNNNN.pt: what a resumed run needs besides the networks and the optimizer."""
        return {
            "step": step,
            "rng": rngs,
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else {},
            "lg_loss_scale": self.mp_trainer.lg_loss_scale.detach().cpu(),
            "seed": int(self.seed),
            "config": dict(self.run_config),
            "plan": self.plan_state(),
        }

    def _checkpoint_contents(self, step, rngs):
        """(file name, function returning the object to save) for each file of a checkpoint, the model last."""
        as_state_dict = self.mp_trainer.master_params_to_state_dict
        names = checkpoint_files(step, self.ema_rate, self.extra_checkpoint_names, self.checkpoint_format)
        makers = [lambda p=params: as_state_dict(p) for params in self.ema_params]
        makers += [self.opt.state_dict, lambda: self._run_state(step, rngs)]
        makers += [module.state_dict for _, module in self._extra_checkpoints()]
        makers.append(lambda: as_state_dict(self.mp_trainer.master_params))
        return list(zip(names, makers))

    def _extra_checkpoints(self):
        """Hook: (file prefix, module) pairs saved with each checkpoint."""
        return []


# ----- consistency models and progressive distillation -----------------------------------------


class CMTrainLoop(TrainLoop):
    """The training modes with a step schedule (cm.training_modes): consistency distillation and training (CM
    paper Alg. 2 / 3), progressive distillation, and every mode of the registry but EDM.

    :param target_model: the target network theta- (a copy of the model), for modes with a target.
    :param teacher_model: frozen teacher for modes whose loss runs one; the same weights on every rank
        (e.g. loaded from one file), as it is not broadcast.
    :param teacher_diffusion: the teacher's KarrasDenoiser.
    :param training_mode: a name in cm.training_modes.TRAINING_MODES.
    :param ema_scale_fn: the reference's schedule, step -> (mu(k), N(k)) (cm.schedules.create_ema_and_scales_fn);
        give it or schedule_fn.
    :param schedule_fn: step -> {name: value}, the mode's own schedule (TrainingMode.schedule_fn); its values are
        handed to the loss and logged under their names.
    :param total_training_steps: K; training stops there.
    :param teacher_solver: heun | euler, the teacher's ODE step in consistency distillation (None: the mode's).
    :param loss_options: values of the mode's own flag groups (cm.training_modes.TrainingMode.loss_groups).
    Other arguments as TrainLoop. A time budget re-plans the schedule from run_config["schedule"].
    """

    def __init__(
        self,
        *,
        target_model,
        teacher_model,
        teacher_diffusion,
        training_mode,
        total_training_steps,
        ema_scale_fn=None,
        schedule_fn=None,
        teacher_solver=None,
        loss_options=None,
        **kwargs,
    ):
        mode = get_training_mode(training_mode)
        if kwargs.get("time_budget") and "schedule" not in (kwargs.get("run_config") or {}):
            raise ValueError("a time budget re-plans the schedule: pass a run_config with its schedule")
        if not mode.has_step_schedule:
            raise ValueError(f"training_mode {mode.name} has no step schedule; train it with TrainLoop")
        if (ema_scale_fn is None) == (schedule_fn is None):
            raise ValueError("pass one schedule: ema_scale_fn (step -> (mu, N)) or schedule_fn (step -> named values)")
        if mode.teacher_in_loss and teacher_model is None:
            raise ValueError(f"training_mode {mode.name} needs a teacher model (--teacher_model_path)")
        if mode.target and target_model is None:
            raise ValueError(f"training_mode {mode.name} needs a target model")
        self.mode = mode
        self.training_mode = mode.name
        self.ema_scale_fn = ema_scale_fn
        self.schedule_fn = schedule_fn or named_schedule(ema_scale_fn)
        self.target_model = target_model if mode.target else None
        self.teacher_model = teacher_model if mode.teacher_in_loss else None
        self.teacher_diffusion = teacher_diffusion
        self.teacher_solver = teacher_solver
        self.loss_options = dict(loss_options or {})
        if self.target_model is not None:
            self.target_model.requires_grad_(False)
            self.target_model.train()
        if self.teacher_model is not None:
            self.teacher_model.requires_grad_(False)
        if self.target_model is not None:
            dist_util.sync_params(self.target_model.parameters())  # before fsdp splits it
        super().__init__(total_training_steps=total_training_steps, **kwargs)
        if self.target_model is not None:
            named = dict(self.target_model.named_parameters())
            self.target_params = [named[n] for n in self.mp_trainer.param_names]
        self._update_schedule()

    def _networks_to_shard(self):
        return [n for n in (self.target_model, self.teacher_model) if n is not None]

    def _needs_fp32_weights(self):
        return self.mode.takes_jvp

    def _bind_loss(self):
        """The mode's loss, bound once to this loop's networks."""
        context = LossContext(self.target_model, self.teacher_model, self.teacher_diffusion, self.teacher_solver,
                              options=self.loss_options, config=self.run_config)
        return self.mode.bind_loss(self.diffusion, context)

    def _load_extra_checkpoints(self, directory, step, fmt="pt"):
        for name, module in self._extra_checkpoints():
            path = bf.join(directory, network_file(name, step, fmt if name.endswith("_model") else "pt"))
            if bf.exists(path) and isinstance(module, torch.nn.Module):
                self._load_network(module, dist_util.load_state_dict(path, map_location=self.device), path)
            elif bf.exists(path):
                module.load_state_dict(dist_util.load_state_dict(path, map_location=self.device))
            elif name == "target_model":
                logger.log(f"{path} not found: the target network starts as a copy of the model")
                module.load_state_dict(self.model.state_dict())

    def _extra_checkpoints(self):
        networks = {"target_model": self.target_model, "teacher_model": self.teacher_model}
        # a bound loss may own state of its own (UFOGen's discriminator and its optimizer): saved and resumed too
        owned = list(getattr(self.loss_fn, "extra_checkpoints", ()))
        return [(name, networks[name]) for name in self.mode.saved_networks] + owned

    def set_run_length(self, total_training_steps, lr_anneal_steps):
        """The run ends at total_training_steps; the mode's schedule is rebuilt from the resolved configuration to
        span it (mu(k), N(k), stages)."""
        super().set_run_length(total_training_steps, lr_anneal_steps)
        self.schedule_fn = self.mode.schedule_fn({**self.run_config["schedule"], "total_steps": total_training_steps})
        self.ema_scale_fn = None

    @property
    def global_step(self):
        """The step count, under the reference's name."""
        return self.step

    def _update_schedule(self):
        """The schedule's values at this step (from the current schedule_fn, which a caller may replace)."""
        self.schedule_values = self.schedule_fn(self.step)

    def run_step(self, batch, cond):
        self._update_schedule()
        if self.mode.promotes_student:
            self.reset_training_for_progdist()
        super().run_step(batch, cond)

    def _after_optimize(self, found_inf):
        if self.target_model is None:
            return
        rate = skip_aware_rate(self.schedule_values["target_ema"], found_inf)
        update_ema(self.target_params, self.mp_trainer.master_params, rate=rate)
        drop_gathered(self.target_model)

    def reset_training_for_progdist(self):
        """At a change of N (progressive distillation): the student becomes the teacher; optimizer and EMAs restart."""
        n = self.schedule_values["num_scales"]
        if self.step == 0 or n == self.schedule_fn(self.step - 1)["num_scales"]:
            return
        logger.log(f"{self.mode.name}: step {self.step}, N = {n}; the student becomes the teacher")
        drop_gathered(self.teacher_model)  # its registered parameters are the shards again
        update_ema(self.teacher_model.parameters(), self.model.parameters(), rate=0.0)
        self.opt = make_optimizer(self.optimizer_name, self.mp_trainer.master_params, self.lr, self.weight_decay,
                                  self.betas)
        self._anneal_lr()
        for params in self.ema_params:
            update_ema(params, self.mp_trainer.master_params, rate=0.0)

    def log_step(self, found_inf=None):
        super().log_step(found_inf)
        logger.logkvs(self.schedule_values)  # the values this step used
