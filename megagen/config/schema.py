"""The one config object: typed dataclasses per component, from YAML to every part of a run.

Each field carries its help text and constraints in `metadata` so that validation and `--help` come
from the same place as the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_STEPS = 10**9
"""Upper bound of `train.steps`, a guard against typos only: nothing scales with it (the data plan computes
any step's requests and sampler state from the step number, megagen/data/request_plan.py). Real runs take
10^5-10^6 steps; 10^9 steps at even 10 steps/s is over three years of training, so a larger value is a
slip of the keyboard (an extra zero, `1e10`), refused naming the key rather than run."""


def opt(
    default,
    help: str,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
    **extra,
):
    """A config field: default, help line, optional allowed values and bounds (`min`/`max` inclusive,
    `above`/`below` exclusive). A float field must be finite unless declared `finite=False`: YAML and the
    command line both read `inf`, `nan` and `1e400` as floats, and none of them is a usable setting."""
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "above": above,
        "below": below,
        "finite": finite,
        **extra,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    dir: str = opt("runs/default", "run directory: resolved config, metrics.jsonl, TensorBoard, checkpoints")
    seed: int = opt(0, "global seed; sample i of step s depends only on (seed, s, i)", min=0)
    name: str = opt("", "free-form run name shown in logs")
    overwrite: bool = opt(
        False, "start afresh in a run.dir that already holds another run's metrics (they are replaced)"
    )


@dataclass
class ModelConfig:
    """Which registered spec to build, and at which size."""

    spec: str = opt("video", "registered spec name (`megagen specs`) or a dotted path `pkg.module:SPEC`")
    preset: str = opt("tiny", "size preset defined by the spec (video: tiny, small, 1b, 5b, 30b)")
    init_std: float = opt(0.02, "std of the normal init of linear weights", min=0.0)
    qk_norm: bool = opt(False, "learned RMSNorm of queries and keys over head_dim (video, upsampler, audio)")
    init: str = opt(
        "default",
        "initialisation: the spec's own (default), or live: a test option that adds N(0, init_std) noise to "
        "every parameter so that every path (zero output layer, gates, nulls, norm weights) carries "
        "gradient from step 1",
        choices=("default", "live"),
    )


@dataclass
class ParallelConfig:
    """The device mesh and how the model is sharded over it (see docs/parallelism.md)."""

    dp_replicate: int = opt(1, "HSDP replica groups (outermost mesh axis)", min=1)
    dp_shard: int = opt(-1, "FSDP shard group size; -1 = the rest of the world", min=-1)
    cp: int = opt(1, "context-parallel size over the video-token sequence", min=1)
    tp: int = opt(1, "tensor-parallel size (innermost axis, inside a node); must divide the heads", min=1)
    cp_kind: str = opt("allgather_kv", "context-parallel attention", choices=("allgather_kv", "ulysses"))
    sequence_parallel: bool = opt(True, "shard activations between TP regions on the sequence dim over tp")
    param_dtype: str = opt("fp32", "FSDP compute dtype of parameters", choices=("fp32", "bf16"))
    reduce_dtype: str = opt("fp32", "FSDP gradient reduction dtype", choices=("fp32", "bf16"))
    reshard_after_forward: bool = opt(True, "FSDP frees gathered parameters after each block's forward")
    grad_sync: str = opt(
        "last_micro",
        "gradient accumulation under FSDP: reduce-scatter on every micro-batch (every_micro: sharded "
        "gradients only), or only on the last one (last_micro: FSDP2 no-sync, less traffic, but each rank "
        "holds its unsharded gradients in the reduce dtype between micro-batches)",
        choices=("every_micro", "last_micro"),
    )
    compile: bool = opt(False, "torch.compile each transformer block")
    compile_backend: str = opt(
        "inductor", "torch.compile backend for parallel.compile", choices=("inductor", "aot_eager", "eager")
    )
    backend: str = opt("auto", "process-group backend", choices=("auto", "gloo", "nccl"))
    overlap: bool | str = opt(
        "auto",
        "communication/compute overlap, every kind at once (docs/parallelism.md): CP all-gather K/V behind "
        "local attention with a log-sum-exp merge, stacked Ulysses all-to-all, tp-partial gradient sums in "
        "backward, TP+SP sequence pieces; true, false, or auto: on for CUDA, off on CPU, where gloo shares "
        "the cores with the compute and no step was measured faster (docs/benchmarking.md)",
        words=("auto",),
    )


@dataclass
class DataConfig:
    """Where samples come from. Synthetic data is a learnable, seeded stand-in for real latents."""

    synthetic: bool = opt(True, "generate seeded synthetic latents when data.path is empty")
    path: str = opt("", "directory of bucketed latent shards; when set, training reads it")
    latent_frames: int = opt(4, "synthetic: latent frames T", min=1)
    latent_height: int = opt(8, "synthetic: latent height H (divisible by the spec's patch size)", min=1)
    latent_width: int = opt(8, "synthetic: latent width W (divisible by the spec's patch size)", min=1)
    text_tokens: int = opt(8, "synthetic: tokens per text encoder", min=1)
    synthetic_classes: int = opt(8, "synthetic: distinct (caption, video) pairs the model can learn", min=1)
    loader: str = opt(
        "auto", "shard loader (auto = DALI when installed, else torch)", choices=("auto", "dali", "torch")
    )
    num_workers: int = opt(2, "loader worker processes (torch) / python workers (DALI)", min=0)
    prefetch: int = opt(2, "micro-batches prefetched per worker / DALI queue depth", min=1)
    threads: int = opt(2, "DALI CPU threads (they copy the batches out of the shards' memory maps)", min=1)
    dali_source: str = opt(
        "map",
        "DALI's source: views of the memory maps copied by DALI's threads (map), or python worker processes "
        "(workers: data.num_workers of them)",
        choices=("map", "workers"),
    )
    on_error: str = opt(
        "fail", "unreadable sample: stop, or skip it (logged and counted)", choices=("fail", "skip")
    )
    verify: str = opt(
        "size",
        "shard verification at start-up, shared by the ranks (each checks 1/world of the shards): size = "
        "stat and header, checksum = also sha256; none = checked when first read",
        choices=("none", "size", "checksum"),
    )
    check_finite: str = opt(
        "on_nan_loss",
        "NaN/inf latents: scan a step's samples only when its loss is not finite (on_nan_loss), or every "
        "sample on read (eager; always so with on_error=skip)",
        choices=("on_nan_loss", "eager"),
    )
    bucket_batch: dict = opt(
        {}, "per-bucket batch sizes {bucket: {global: G, micro: M}}; default train.global/micro_batch_size"
    )
    bucket_weights: dict = opt(
        {}, "per-bucket draw weights {bucket: w}; default: each bucket's share of steps"
    )


@dataclass
class EvalConfig:
    """Held-out loss per bucket on a fixed t grid with fixed noise (comparable across runs and meshes)."""

    path: str = opt("", "dataset directory of held-out shards; empty disables evaluation")
    every: int = opt(0, "evaluate every N steps (and after the last); 0 disables", min=0)
    samples: int = opt(8, "samples per bucket (the first N of each bucket)", min=1)
    micro_batch_size: int = opt(4, "samples per evaluation forward", min=1)
    t_values: str = opt("0.1,0.3,0.5,0.7,0.9", "comma-separated timesteps of the evaluation grid")
    seed: int = opt(1234, "seed of the fixed evaluation noise", min=0)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = opt(3e-4, "peak learning rate (0 trains nothing: a dry run of data and steps)", min=0.0)
    min_lr_ratio: float = opt(0.1, "final lr as a fraction of the peak (cosine)", min=0.0, max=1.0)
    warmup_steps: int = opt(10, "linear warmup steps", min=0)
    schedule: str = opt("cosine", "lr schedule after warmup", choices=("cosine", "constant", "linear"))
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", min=0.0)
    beta1: float = opt(0.9, "AdamW beta1, in [0, 1)", min=0.0, below=1.0)
    beta2: float = opt(0.95, "AdamW beta2, in [0, 1)", min=0.0, below=1.0)
    eps: float = opt(1e-8, "AdamW epsilon (> 0: keeps the update's denominator off zero)", above=0.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 disables", min=0.0)
    fused: str = opt("auto", "fused AdamW kernel", choices=("auto", "true", "false"))


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = opt(
        100,
        "optimizer steps to run (at most 10^9, a guard against typos: no cost grows with it)",
        min=1,
        max=MAX_STEPS,
    )
    global_batch_size: int = opt(8, "samples per optimizer step over all data-parallel ranks", min=1)
    micro_batch_size: int | str = opt(
        "auto",
        "samples per forward/backward on one rank; auto = per bucket, the largest that divides the global "
        "batch over the data-parallel ranks and fits memory",
        min=1,
        words=("auto",),
    )
    cond_dropout: float = opt(
        0.1, "probability of replacing each text condition by its null embedding", min=0.0, max=1.0
    )
    recompute: str = opt("none", "activation recompute per block", choices=("none", "full", "selective"))
    recompute_layers: int = opt(-1, "apply train.recompute to the first k blocks; -1 = every block", min=-1)
    t_mean: float = opt(0.0, "logit-normal timestep mean", min=None)
    t_std: float = opt(1.0, "logit-normal timestep std", min=0.0)
    log_every: int = opt(1, "print a line every N steps", min=1)
    step_timeout_s: float = opt(
        -1.0,
        "a step running longer makes every rank report where it is stuck (and which ranks have not got "
        "there) and exit with code 86; seconds, -1 = auto (1800 s for the first 3 steps, then "
        "max(600 s, 20 x the median of the last 100 steps)), 0 = off",
        min=-1.0,
    )
    nonfinite: str = opt(
        "stop",
        "a step whose loss or gradient norm is NaN/inf: stop before its optimizer step, naming it (no "
        "checkpoint of it is written), or skip its update (skip_step: logged, counted as skipped_steps)",
        choices=("stop", "skip_step"),
    )
    max_skipped_steps: int = opt(
        5, "train.nonfinite=skip_step: stop after this many consecutive skipped steps", min=1
    )
    ema_decay: float = opt(
        0.0, "decay of an exponential moving average of the weights, in [0, 1); 0 = off", min=0.0, below=1.0
    )
    fp8: bool = opt(
        False,
        "FP8 GEMMs in block linears (tensor-parallel shards included) via Transformer Engine (torch path "
        "without it, logged once)",
    )
    cuda_graphs: bool = opt(
        False, "capture each bucket's block forward+backward as CUDA graphs (one GPU, no FSDP/TP/CP)"
    )
    gc_every: int = opt(
        50, "Python garbage collection after every N steps, automatic collection off; 0 = automatic", min=0
    )


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    every: int = opt(0, "save every N steps (and after the last step); 0 disables", min=0)
    dir: str = opt("", "checkpoint directory; empty = <run.dir>/checkpoints")
    keep: int = opt(3, "complete checkpoints kept (older ones are deleted); 0 keeps all", min=0)
    async_save: bool = opt(False, "write checkpoints in the background while training continues")
    resume: str = opt("auto", "auto = latest complete checkpoint in dir if any; never; or a checkpoint PATH")
    init_from: str = opt(
        "",
        "start from another run's weights (new optimizer); position tables are extended; also a diffusers "
        "save_pretrained directory for specs with a diffusers mapping (wan)",
    )
    verify: str = opt(
        "checksum",
        "before reading a checkpoint (resume, init_from): checksum = every file's checksum, each rank "
        "hashing its share in parallel; size = file sizes only",
        choices=("checksum", "size"),
    )


@dataclass
class MetricsConfig:
    """Where per-step metrics go."""

    tensorboard: bool = opt(True, "write TensorBoard event files under <run.dir>/tb")
    jsonl: bool = opt(True, "write <run.dir>/metrics.jsonl, one JSON object per step")
    progress: str = opt("auto", "progress display", choices=("auto", "bar", "lines", "none"))
    comm: bool = opt(False, "count collective bytes per mesh axis and log them as comm_bytes")
    mfu: bool = opt(True, "log tflops / mfu / hfu per step (on CPU the peak is a measured matmul rate)")
    profile_steps: str = opt("", "`a,b`: write a torch.profiler trace of steps a..b to <run.dir>/profile")


@dataclass
class KernelsConfig:
    """Which implementation runs each fused op and attention (see docs/kernels.md)."""

    backend: str = opt(
        "auto",
        "fused ops: auto = fastest available (CPU: torch), torch = reference, triton, te",
        choices=("auto", "torch", "triton", "te"),
    )
    attention: str = opt(
        "auto",
        "attention: auto = SDPA's choice; pin an SDPA backend; te = Transformer Engine",
        choices=("auto", "flash", "cudnn", "efficient", "math", "te"),
    )


@dataclass
class TAEConfig:
    """The TAE spec's loss (`model.spec=tae`; other specs ignore it): see megagen/specs/tae/loss.py."""

    kl_weight: float = opt(1e-6, "β: weight of the KL term (a mean over latent elements)", min=0.0)
    opl_weight: float = opt(1.0, "weight of the outlier penalty loss", min=0.0)
    opl_radius: float = opt(
        3.0, "OPL radius r: latent values within r std of their channel mean cost nothing", min=0.0
    )
    perceptual_weights: str = opt(
        "", "safetensors file of VGG16 `features` weights for a perceptual term; empty = no such term"
    )
    perceptual_weight: float = opt(
        0.1, "weight of the perceptual term (used only with perceptual_weights)", min=0.0
    )


@dataclass
class Config:
    """Everything a run needs; one object flows to every component."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tae: TAEConfig = field(default_factory=TAEConfig)
