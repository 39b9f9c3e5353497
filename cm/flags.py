"""The table of command-line flags: every flag once, with its default, help text, allowed values and the
object it configures.

Groups name the object a flag builds, and a flag's name is that object's keyword (or the group says how
it is turned into one in cm.config):
  network           cm.script_util.create_model(**network)
  denoiser          KarrasDenoiser(**denoiser)
  schedule          cm.schedules.create_ema_and_scales_fn(**schedule)     (consistency modes)
  schedule_sampler  cm.resample.create_named_schedule_sampler             (EDM)
  teacher           the teacher network and how the student starts
  optimizer, loop   TrainLoop / CMTrainLoop(**optimizer, **loop)
  data              cm.image_datasets.load_data(**data)
  run               processes, devices, seeds and output
  sample, edit, search   the sampling, editing and ternary-search scripts

These are the shared groups. A training method's own groups (ect, lcm, trigflow, scm_loss, ...) are rows of its
module in cm/modes/ (its `FLAGS`, made with `flag_rows`); cm.training_modes joins them to this table. The
reference's `*_defaults()` dicts (cm.script_util) and every script's parser are made from the joined table; a
script may give some flags other defaults (SCRIPT_DEFAULTS), never other meanings.
"""

from dataclasses import dataclass

from .editing import TASKS
from .karras_diffusion import DEFAULT_TEACHER_SOLVER, INDEX_SAMPLERS, TEACHER_SOLVERS, WEIGHT_SCHEDULES
from .modes.consistency import CT_TARGETS
from .metrics import LOSS_NORMS
from .networks import MODEL_TYPES, NUM_CLASSES
from .nn import JVP_METHODS
from .random_util import GENERATORS
from .sampling import SAMPLERS
from .schedules import SCALE_MODES, TARGET_EMA_MODES
from .stop_request import PREEMPT_SIGNALS
from .unet import ATTENTION_TYPES

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("radam", "adam", "adamw")


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    :param name: the flag (--name) and the keyword of the object it builds.
    :param default: default value; its type is the flag's type (bools parse yes/no, true/false, 1/0).
    :param group: the object the flag configures (see the module docstring).
    :param help: one line for --help.
    :param choices: allowed values of an enum flag.
    :param affects_result: False for flags that change how a run is watched or stored, not what it computes
        (a resumed run may change them freely).
    :param scripts: for a method's own flags, the scripts whose parsers take it ("train", "sample", "edit",
        "search"); the shared flags are placed by SCRIPT_FLAGS.
    """

    name: str
    default: object
    group: str
    help: str
    choices: tuple = None
    affects_result: bool = True
    scripts: tuple = ("train",)


def flag_rows(group, *rows, affects_result=True, scripts=("train",)):
    """Flags of one group from (name, default, help, choices) rows."""
    return [Flag(name, default, group, help, choices, affects_result, scripts) for name, default, help, choices in rows]


_NCSNPP = "NCSN++ only: "

SHARED_FLAGS = {
    flag.name: flag
    for flag in [
        *flag_rows(
            "network",
            ("model_type", "adm", "network family: adm (ADM UNet), ncsnpp (NCSN++) or dit (DiT transformer, sized "
             "by --dit_size; the UNets' width and attention flags do not apply to it)", MODEL_TYPES),
            ("image_size", 64, "image resolution in pixels (square)", None),
            ("in_channels", 3, "channels of the network's input: 3 for images, the latent channels for pre-encoded "
             "latents (scripts/prepare_data.py --kind latents); --autoencoder_path sets it itself", None),
            ("dit_size", "B/2", "DiT only: size/patch of DiT Table 1 (S 12 layers x 384 wide, 6 heads; B 12 x 768, 12; "
             "L 24 x 1024, 16; XL 28 x 1152, 16; patch 2, 4 or 8; e.g. XL/2), or DEPTHxWIDTHxHEADS/PATCH", None),
            ("dit_mlp_ratio", 4.0, "DiT only: MLP hidden width / token width (4 in DiT)", None),
            ("dit_final_conv", False, "DiT only: a 3x3 convolution after the patches are put back together (U-ViT's; "
             "starts as the identity), so neighbouring patches meet without seams; off keeps DiT's parameters", None),
            ("num_channels", 128, "base width of the network", None),
            ("num_res_blocks", 2, "residual blocks per resolution level", None),
            ("num_heads", 4, "attention heads (when num_head_channels is -1)", None),
            ("num_heads_upsample", -1, "attention heads in the decoder (-1: num_heads)", None),
            ("num_head_channels", -1, "channels per attention head (-1: use num_heads)", None),
            ("attention_resolutions", "32,16,8", "comma list of resolutions (pixels) with self-attention, e.g. 32,16,8", None),
            ("channel_mult", "", "comma list of width multipliers per level ('' picks the reference's for image_size)", None),
            ("dropout", 0.0, "dropout probability in residual blocks", None),
            ("class_cond", False, "class-conditional model (labels from file names or the dataset)", None),
            ("num_classes", NUM_CLASSES, "number of classes when class_cond", None),
            ("null_class", False, "classifier-free guidance: one more label-embedding row, the null label num_classes "
             "(--class_dropout_prob trains it, --guidance_scale samples with it); off keeps the reference's parameters",
             None),
            ("guidance_embed", False, "the network also takes the guidance scale w through an embedding (LCM students; "
             "off keeps the reference's parameters)", None),
            ("second_time_embed", False, "the network also takes a second time through its own embedding, summed with "
             "the first (flow maps: MeanFlow's (t, t - r)); off keeps the reference's parameters", None),
            ("use_checkpoint", False, "gradient checkpointing (less memory, more compute)", None),
            ("use_scale_shift_norm", True, "FiLM-style scale/shift conditioning in residual blocks", None),
            ("adaptive_double_norm", False, "sCM's adaptive double normalisation of that conditioning: norm(h) "
             "pnorm(1 + scale) + pnorm(shift) (ADM UNet; no parameters, so checkpoints load either way)", None),
            ("logvar_channels", 0, "width of sCM's log-variance head u(t) of the adaptive weighting, a submodule "
             "logvar_head of the network (0: none, the reference's parameters)", None),
            ("resblock_updown", False, "residual blocks for up/downsampling", None),
            ("fp32_time_embedding", False, "compute the time embedding (sinusoidal features and their MLP) in float32 "
             "under mixed precision (NVlabs/rcm#10; no parameters change, off: the reference's precision)", None),
            ("use_fp16", False, "float16 network body with fp32 master weights and dynamic loss scaling", None),
            ("use_new_attention_order", False, "(three, heads, dim) qkv layout regardless of attention_type", None),
            ("attention_type", "flash", "qkv channel layout: flash or legacy (the reference's two; released "
             "checkpoints) or guided (guided-diffusion's heads-first order); always SDPA", ATTENTION_TYPES),
            ("learn_sigma", False, "output 6 channels (kept for checkpoint compatibility; the extra 3 are unused)", None),
            ("fir", True, _NCSNPP + "FIR-filtered up/downsampling", None),
            ("fir_kernel", "1,3,3,1", _NCSNPP + "FIR kernel taps, comma list", None),
            ("skip_rescale", True, _NCSNPP + "scale skip connections by 1/sqrt(2)", None),
            ("resblock_type", "biggan", _NCSNPP + "residual block type", ("biggan", "ddpm")),
            ("progressive", "none", _NCSNPP + "progressive output path", ("none", "output_skip", "residual")),
            ("progressive_input", "residual", _NCSNPP + "progressive input path", ("none", "input_skip", "residual")),
            ("progressive_combine", "sum", _NCSNPP + "how progressive paths are merged", ("sum", "cat")),
            ("embedding_type", "fourier", _NCSNPP + "noise-level embedding", ("fourier", "positional")),
            ("fourier_scale", 16.0, _NCSNPP + "scale of the Gaussian Fourier embedding", None),
            ("init_scale", 0.0, _NCSNPP + "scale of the final layers' initialisation (0: 1e-10, as score_sde)", None),
            ("resamp_with_conv", True, _NCSNPP + "learned convolution in up/downsampling", None),
        ),
        *flag_rows(
            "denoiser",
            ("sigma_min", 0.002, "smallest noise level eps (boundary condition of the consistency function)", None),
            ("sigma_max", 80.0, "largest noise level T", None),
            ("weight_schedule", "karras", "loss weighting lambda(sigma); ict = 1/(t_n - t_(n+1))", WEIGHT_SCHEDULES),
            ("loss_norm", "lpips", "distance d(x, y) of the consistency / progdist loss", LOSS_NORMS),
            ("index_sampler", "uniform", "how the grid index n is drawn: uniform (CM) or lognormal (iCT)", INDEX_SAMPLERS),
            ("p_mean", -1.1, "lognormal index sampler mean of log sigma (iCT: -1.1)", None),
            ("p_std", 2.0, "lognormal index sampler std of log sigma (iCT: 2.0)", None),
            ("lpips_vgg_path", "", "local torchvision VGG16 weights for LPIPS (or set CM_LPIPS_VGG_PATH)", None),
        ),
        *flag_rows(
            "schedule",
            ("target_ema_mode", "fixed", "target network EMA: fixed (start_ema) or adaptive mu(k)", TARGET_EMA_MODES),
            ("scale_mode", "fixed", "discretisation N(k): fixed, progressive (CM), exponential (iCT), progdist (halving)", SCALE_MODES),
            ("start_ema", 0.0, "mu0: target EMA decay (0: stop-gradient of the online network, iCT)", None),
            ("start_scales", 40, "s0: initial number of discretisation points N", None),
            ("end_scales", 40, "s1: final N for progressive / exponential schedules", None),
            ("distill_steps_per_iter", 50000, "progdist: steps before N halves", None),
        ),
        *flag_rows(
            "schedule_sampler",
            ("schedule_sampler", "lognormal", "EDM noise-level distribution (lognormal: P_mean -1.2, P_std 1.2)", ("lognormal", "uniform")),
        ),
        *flag_rows(
            "ct_target",
            ("ct_target", "sample", "CT's (and ECT's) target point at the nearer noise level: sample, x + t_(n+1) z "
             "(the CM paper's); stf, an Euler step from x + t_n z with the stable target field, the batch's posterior "
             "mean of x0 (same class when class-conditional; STF, Xu et al. 2023; SCT, Wang et al. 2024)", CT_TARGETS),
        ),
        *flag_rows(
            "teacher",
            ("teacher_model_path", "", "EDM teacher checkpoint (consistency_distillation, progdist; with other modes it "
             "initialises the student, as the reference)", None),
            ("teacher_dropout", 0.1, "dropout of the teacher network (takes effect only with --teacher_stochastic true)", None),
            ("teacher_stochastic", False, "run the teacher in train mode, its dropout active (the reference ran it in "
             "eval mode)", None),
            ("teacher_solver", DEFAULT_TEACHER_SOLVER, "ODE solver for the teacher step in consistency distillation", TEACHER_SOLVERS),
            ("teacher_guidance_scale", 1.0, "classifier-free guidance scale w of the teacher in distillation (CD, sCD): "
             "D_w = D_u + w (D_c - D_u), the teacher class-conditional with a null class (1: the conditional teacher, "
             "the reference's)", None),
            ("init_from_teacher", "auto", "initialise the student (and target) from the teacher: auto = yes whenever "
             "--teacher_model_path is given (the reference's behaviour)", ("auto", "true", "false")),
        ),
        *flag_rows(
            "optimizer",
            ("optimizer", "radam", "radam (the reference's), adam or adamw (fused)", OPTIMIZERS),
            ("lr", 1e-4, "learning rate", None),
            ("weight_decay", 0.0, "optimizer weight decay", None),
            ("adam_betas", "0.9,0.999", "the optimizer's (beta1, beta2), comma pair (MeanFlow on ImageNet: 0.9,0.95)",
             None),
            ("lr_anneal_steps", 0, "anneal lr linearly to 0 over this many steps (0: constant)", None),
            ("lr_warmup_steps", 0, "raise lr linearly over the first steps (0: no warm-up)", None),
        ),
        *flag_rows(
            "loop",
            ("total_training_steps", 600000, "training steps K: schedules span K and training stops there "
             "(0: until interrupted)", None),
            ("time_budget_minutes", 0.0, "minutes of training to fit the run into (0: none): from its measured "
             "speed the run re-plans total_training_steps, lr_anneal_steps and the mode's schedule to end on time", None),
            ("microbatch", -1, "images per forward/backward, gradients accumulated (-1: whole batch)", None),
            ("ema_rate", "0.9999", "comma list of EMA decays of the saved EMA models", None),
            ("fp16_scale_growth", 1e-3, "increase of lg_loss_scale per good fp16 step", None),
            ("use_bf16", False, "bfloat16 autocast (training) or a bfloat16 network body (sampling)", None),
            ("channels_last", True, "channels_last memory format for images and networks", None),
            ("class_dropout_prob", 0.0, "classifier-free guidance: replace each training label by the null label with "
             "this probability (needs --null_class true)", None),
        ),
        *flag_rows(
            "loop",
            ("log_interval", 10, "steps between log lines", None),
            ("save_interval", 10000, "steps between checkpoints (-1: only at the end)", None),
            ("resume_checkpoint", "", "modelNNNNNN.pt to start from when log_dir holds no checkpoint", None),
            ("max_minutes", 0.0, "checkpoint and stop after this many minutes of training (0: no limit)", None),
            ("checkpoint_format", "pt", "file format of the model, EMA and target checkpoints: pt (the reference's "
             "modelNNNNNN.pt names) or safetensors; resume, sampling and teacher paths read both", ("pt", "safetensors")),
            ("parallel", "ddp", "ddp: every rank holds whole networks (the reference's); fsdp: networks, optimizer and "
             "EMAs sharded over the ranks (FSDP2) with distributed checkpoints shardedNNNNNN/ that resume at any "
             "number of ranks", ("ddp", "fsdp")),
            ("full_checkpoint_interval", 0, "with --parallel fsdp: steps between the single files (modelNNNNNN.pt, "
             "ema_RATE_NNNNNN.pt, ...) gathered for sampling and export (0: at every checkpoint; always at the end)",
             None),
            ("async_checkpoint", False, "with --parallel fsdp: write each checkpoint in the background while training "
             "goes on (one at a time; the run waits for the last)", None),
            ("keep_checkpoints", 0, "keep only the newest K complete checkpoints (K >= 2), deleting older steps' files "
             "after each save (0: keep all)", None),
            ("preempt_signal", "USR1", "the pre-emption warning signal (SLURM: #SBATCH --signal=USR1@120): like "
             "SIGTERM, every rank checkpoints the same step and the run exits 0; none: only SIGINT / SIGTERM",
             PREEMPT_SIGNALS),
            ("requeue", False, "after a pre-emption warning's checkpoint, requeue the SLURM job (scontrol requeue "
             "$SLURM_JOB_ID on rank 0) so that it resumes when it runs again", None),
            affects_result=False,
        ),
        *flag_rows(
            "data",
            ("data_dir", "", "image folder, .npz file (arr_0 NHWC uint8), 'digits' (the embedded scikit-learn digits) "
             "or 'digits_train' (their training half, which the quickstart's metrics never see)", None),
            ("random_flip", True, "random horizontal flips", None),
            ("on_bad_image", "skip", "unreadable image: skip (with a warning naming it) or error", ("skip", "error")),
            ("max_bad_images", 0.01, "with --on_bad_image skip, stop once more distinct images than this could not be "
             "read on a rank: a count if >= 1, a fraction of the image files (rounded up) if below 1; -1: no limit", None),
        ),
        *flag_rows(
            "run",
            ("training_mode", "consistency_distillation", "what the model is (or was) trained as; consistency modes "
             "use the boundary-condition scalings", None),  # choices: the registry's modes (cm.training_modes)
            ("global_batch_size", 2048, "images per step over all ranks (used when batch_size is -1)", None),
            ("batch_size", -1, "images per step (training; -1: global_batch_size / ranks) or per forward pass "
             "(sampling) on each rank", None),
            ("seed", 0, "random seed (same seed and flags give the same run)", None),
            ("sample_indexed_rng", True, "training: draw the loss's noise, noise levels and label dropout from (seed, "
             "step, global sample index) (cm.sample_rng), so a run resumed on another number of ranks with the same "
             "global batch continues the same trajectory; false: each rank's own RNG stream", None),
            ("jvp", "exact", "how the JVP modes take the network's time derivative: exact (forward-mode AD, the Triton "
             "attention kernel on CUDA) or finite_difference (two forwards with the same dropout masks, cm.nn)",
             tuple(JVP_METHODS)),
        ),
        *flag_rows(
            "run",
            ("log_dir", "", "directory for logs, checkpoints and outputs (default OPENAI_LOGDIR, else a new temp dir); "
             "training reruns resume from it", None),
            ("device", "auto", "auto (GPU of this rank if any), cpu or cuda", DEVICES),
            ("dry_run", False, "print the resolved configuration as JSON and exit", None),
            ("compile", False, "torch.compile each residual / attention block once and reuse it (cm.compile; the "
             "first steps pay the compile time)", None),
            ("allow_config_change", False, "resume a log dir whose checkpoints were made with other settings, using "
             "the new ones (without it such a resume stops and names the settings that differ)", None),
            affects_result=False,
        ),
        *flag_rows(
            "sample",
            ("model_path", "", "checkpoint to sample from: a state dict saved by training (modelNNNNNN.pt, "
             "ema_RATE_NNNNNN.pt) or a released one", None),
            ("generator", "determ", "noise source: dummy (global RNG), determ (one seeded stream), determ-indiv (one "
             "stream per sample); determ and determ-indiv make sample k depend only on the seed and k", GENERATORS),
            ("clip_denoised", True, "clamp every denoised estimate to [-1, 1]", None),
            ("num_samples", 10000, "images to generate over all ranks (image_edit: the first N inputs, -1 all; its "
             "interpolate task: noise pairs, -1 one; ternary_search: images per probe)", None),
            ("sampler", "heun", "onestep / multistep: consistency models (multistep needs --ts); heun, euler, "
             "euler_ancestral, dpm: EDM solvers over a --steps grid; dpmpp_2m: DPM-Solver++(2M), --steps steps in "
             "log-SNR; progdist: progressive-distillation models; meanflow (--steps jumps from t = 1 to 0), "
             "meanflow_onestep: flow maps",
             SAMPLERS),
            ("s_churn", 0.0, "EDM stochasticity S_churn (heun, dpm)", None),
            ("s_tmin", 0.0, "EDM S_tmin: churn only for sigma >= s_tmin", None),
            ("s_tmax", float("inf"), "EDM S_tmax: churn only for sigma <= s_tmax", None),
            ("s_noise", 1.0, "EDM S_noise: scale of the churn noise", None),
            ("steps", 40, "size N of the Karras noise grid (multistep, editing and search: the grid the indices refer to)", None),
            ("ts", "", "increasing grid indices, e.g. 0,22,39 for 2 steps on a 40-point grid (multistep; editing: "
             "the editing levels t_1 > t_2 > ..., the last index only closing the grid)", None),
            ("ctm_gamma", 1.0, "multistep: the share of fresh noise in each re-noising, CTM's gamma-sampling (1: the CM "
             "paper's Alg. 1; below 1 keeps sqrt(1 - gamma^2) of the noise the step removed; 0: deterministic)", None),
            ("grid", "", "PNG grid of the first 64 samples: '' = samples_grid.png in the log dir, 'none' = no grid, "
             "else a path", None),
            ("guidance_scale", 1.0, "classifier-free guidance scale w: D_uncond + w (D_cond - D_uncond) for models with "
             "--null_class, the w input of models with --guidance_embed; 1 = the conditional model", None),
        ),
        *flag_rows(
            "latent",
            ("autoencoder_path", "", "train and sample in the latent space of this autoencoder: a diffusers "
             "AutoencoderKL directory or one written by scripts/train_autoencoder.py ('' = pixel space)", None),
            ("latent_norm", "scale", "how latents enter the network: scale (as encoded, times the autoencoder's "
             "scale factor, e.g. 0.18215: DiT, MeanFlow) or channel (each channel shifted and scaled by "
             "--latent_mean / --latent_std to std 0.5, EDM2's normalisation; sampling undoes it before decoding)",
             ("scale", "channel")),
            ("latent_mean", "", "--latent_norm channel: per-channel mean of the latents, comma list, written "
             "--latent_mean=-0.1,... when it starts with a minus (empty: the latent_mean of the prepared latents .npz "
             "in --data_dir; a run records it in config.json)", None),
            ("latent_std", "", "--latent_norm channel: per-channel std of the latents, comma list (empty: the "
             "latent_std of the prepared .npz)", None),
        ),
        *flag_rows(
            "edit",
            ("task", "inpaint", "what to do: inpaint, colorize, superres, interpolate (noise to noise), stroke (SDEdit "
             "from a stroke painting), denoise", TASKS),
            ("input", "", "images to edit: comma list of files or an .npz (arr_0 uint8 NHWC); center-cropped to "
             "image_size", None),
            ("mask", "box", "inpaint: box (centre square), half (right half), strokes (random lines, from --seed) or a "
             "mask image of image_size, white (>= 128) = pixels to generate", None),
            ("factor", 4, "superres: scale factor f (divides image_size); the input may be full-size or image_size / f", None),
            ("sigma", -1.0, "stroke and denoise: starting noise level (-1: stroke 5.0, denoise 0.3)", None),
            ("add_noise", True, "denoise: first add N(0, sigma^2) noise to the input (false: the input already carries it)", None),
            ("num_frames", 8, "interpolate: frames per noise pair, both ends included", None),
            ("class_label", -1, "class-conditional models: the label of every image (-1: drawn from the generator)", None),
            ("grid_rows", 10, "rows of the {task}.png strip (one input, or one interpolation pair, a row); every result "
             "is in the npz", None),
        ),
        *flag_rows(
            "search",
            ("begin", "0", "grid indices before the searched one, comma list (2 steps: 0; 3 steps: 0,p1)", None),
            ("end", "39", "grid indices after the searched one, comma list (usually steps - 1)", None),
            ("ref_batch", "", "FID reference batch .npz (arr_0 images or mu/sigma statistics, as the evaluator reads)", None),
            ("metric", "auto", "score of a probe: fid (against --ref_batch), digits (digits-FID, models of the embedded "
             "digits), auto (fid when --ref_batch is given, else digits)", ("auto", "fid", "digits")),
            ("inception_weights", "", "FID Inception weights file (default $CM_INCEPTION_WEIGHTS, then the torch hub cache)", None),
        ),
    ]
}


def names_in(*groups):
    """Shared flag names of the given groups, in table order."""
    return tuple(name for name, flag in SHARED_FLAGS.items() if flag.group in groups)


NCSNPP_FLAGS = tuple(name for name, flag in SHARED_FLAGS.items() if flag.help.startswith(_NCSNPP))
DIT_FLAGS = tuple(name for name, flag in SHARED_FLAGS.items() if flag.help.startswith("DiT only: "))
# the UNets' width, level and attention flags, which DiT (sized by --dit_size) does not read
UNET_FLAGS = ("num_channels", "num_res_blocks", "num_heads", "num_heads_upsample", "num_head_channels",
              "attention_resolutions", "channel_mult", "use_scale_shift_norm", "adaptive_double_norm", "resblock_updown",
              "use_new_attention_order", "attention_type")

# the reference's defaults dicts (cm.script_util), by flag name
MODEL_AND_DIFFUSION_FLAGS = ("sigma_min", "sigma_max", "weight_schedule") + names_in("network")
CM_TRAIN_FLAGS = ("training_mode", "total_training_steps", "loss_norm", "index_sampler", "p_mean", "p_std",
                  "lpips_vgg_path") + names_in("teacher", "schedule")
TRAIN_FLAGS = tuple(
    name for name in names_in("data", "schedule_sampler", "optimizer", "loop", "run", "ct_target")
    if name not in CM_TRAIN_FLAGS + MODEL_AND_DIFFUSION_FLAGS
) + ("use_fp16",)
_SCRIPT_COMMON = ("training_mode", "model_path", "generator", "clip_denoised", "batch_size", "steps", "seed",
                  "use_bf16", "channels_last", "log_dir", "device", "dry_run")

# each script's shared flags (besides MODEL_AND_DIFFUSION_FLAGS; cm.training_modes adds the methods' own flags by
# their `scripts`) and the defaults it changes
SCRIPT_FLAGS = {
    "train": TRAIN_FLAGS + CM_TRAIN_FLAGS + names_in("latent"),
    "sample": _SCRIPT_COMMON + ("num_samples", "sampler", "s_churn", "s_tmin", "s_tmax", "s_noise", "ts", "ctm_gamma",
                                "grid", "guidance_scale", "autoencoder_path", "latent_norm", "latent_mean", "latent_std"),
    "edit": _SCRIPT_COMMON + names_in("edit") + ("num_samples", "ts"),
    "search": _SCRIPT_COMMON + names_in("search") + ("num_samples", "ctm_gamma"),
}
# regional compilation of the network (cm.compile) where it is run many times
SCRIPT_FLAGS["sample"] += ("compile",)
SCRIPT_DEFAULTS = {
    "train": {},
    "sample": dict(training_mode="edm", batch_size=16),
    "edit": dict(batch_size=16, generator="determ-indiv", num_samples=-1, ts="0,5,10,15,20,25,30,35,39"),
    "search": dict(batch_size=64, num_samples=500),
}
