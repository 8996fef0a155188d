"""The Flowception trainer: one linear loop from mesh and data to checkpoints and evaluations.

What the loop evaluates is not its business: the caller passes `make_evaluators` (the `main`
command passes `evaluation.evaluators.from_config`, which builds what `config.evals` names), and
the loop runs each evaluator on the EMA weights at its steps and logs what it returns.
"""

from collections.abc import Collection
import functools
import signal
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flowception_jax.core import baselines
from flowception_jax.core import flowception
from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.training import checkpoint
from flowception_jax.training import distributed
from flowception_jax.training import input_pipeline
from flowception_jax.training import memory
from flowception_jax.training import run_log
from flowception_jax.training import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `ema_params` are the weights used for sampling."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay and global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config.learning_rate,
      warmup_steps=min(optim_config.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1),
      end_value=optim_config.learning_rate * optim_config.end_factor)
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                  weight_decay=optim_config.weight_decay))


def model_inputs(batch: dict[str, jax.Array], x_t: jax.Array, times: jax.Array, labels):
  """Arguments of `DiT.__call__` for a batch, with `x_t` in the main channels."""
  context = jnp.where(batch['context_mask'][..., None, None, None], batch['frames'], 0.0)
  return (x_t, context, times, batch['positions'], batch['frame_mask'], labels)


def init_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
               info: datasets.SourceInfo, frames: int) -> TrainState:
  """A fresh train state with boxed (logically partitioned) parameters."""
  params = model_lib.init_params(model, info, frames, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


def _frame_labels(batch: dict[str, jax.Array], drop_keys: jax.Array, flow_config,
                  num_classes: int) -> jax.Array:
  """Class label of every frame slot, int [B, F], dropped to `num_classes` (none) per clip.

  Bucketed batches carry one label per row [B], packed ones one per frame [B, F]; each clip (row
  and segment) is dropped with probability `p_uncond` from its row's key.
  """
  segment_ids = batch['segment_ids']
  b, f = segment_ids.shape
  labels = batch['label']
  labels = jnp.broadcast_to(labels[:, None], (b, f)) if labels.ndim == 1 else labels
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, flow_config.p_uncond, (f + 1,)))(drop_keys)
  return jnp.where(jnp.take_along_axis(drop, segment_ids, axis=1), num_classes, labels)


def frame_attention_of(batch: dict[str, jax.Array], *, method: str,
                       packed: bool) -> jax.Array | None:
  """bool [B, F, F] (query frame, key frame) of a training batch, or None for all real frames.

  Packed rows keep attention within each clip (padding, segment 0, may look anywhere: its keys are
  masked and its outputs unused); the autoregressive methods hide the noisy frames, causally
  (`model.causal_attention`) or not (`model.noncausal_attention`).
  """
  segment_ids = batch['segment_ids']
  attention = None
  if packed:
    attention = ((segment_ids[:, :, None] == segment_ids[:, None, :])
                 | (segment_ids[:, :, None] == 0))
  if method == 'autoregressive':
    past = model_lib.causal_attention(batch['positions'], noisy=batch['flow_mask'])
  elif method == 'autoregressive_noncausal':
    past = model_lib.noncausal_attention(batch['flow_mask'])
  else:
    return attention
  return past if attention is None else attention & past


def loss_segments(batch: dict[str, jax.Array], flow_config) -> jax.Array | None:
  """The clip ids the losses average per clip first (`flow.loss_normalisation` 'clip'), or None
  (every frame of the batch weighs the same)."""
  normalisation = flow_config.get('loss_normalisation', 'frame')
  if normalisation not in flowception.LOSS_NORMALISATIONS:
    raise ValueError(f'unknown loss normalisation {normalisation!r}; set '
                     f'--config.flow.loss_normalisation to one of '
                     f'{", ".join(flowception.LOSS_NORMALISATIONS)}')
  return batch['segment_ids'] if normalisation == 'clip' else None


def compute_losses(params, batch: dict[str, jax.Array], key: jax.Array, *, model: nn.Module,
                   flow_config, num_classes: int, method: str = 'flowception',
                   packed: bool = False):
  """Velocity and rate losses of one batch; noise and label dropout drawn from `key`.

  The autoregressive methods attend as `frame_attention_of` says and their rate loss is the
  end-of-video loss (`baselines.end_loss`). `packed` batches hold several clips per row
  (`data.packing`), which attend only within themselves. `key` is one PRNG key, or one per example
  [B]: each example draws from its own key, so any split of a batch into microbatches draws what
  the whole batch would.
  """
  x1 = batch['frames']
  keys = key if key.ndim else jax.random.split(key, x1.shape[0])
  noise_keys, drop_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  x0 = jax.vmap(lambda k: jax.random.normal(k, x1.shape[1:], x1.dtype))(noise_keys)
  times = flowception.snr_shift(batch['frame_times'], flow_config.snr_shift)
  t = times[..., None, None, None]
  x_t = jnp.where(batch['context_mask'][..., None, None, None], x1, t * x1 + (1 - t) * x0)
  labels = _frame_labels(batch, drop_keys, flow_config, num_classes) if num_classes else None
  velocity, log_rate = model.apply(
      {'params': params}, *model_inputs(batch, x_t, times, labels),
      frame_attention=frame_attention_of(batch, method=method, packed=packed))
  weight = flowception.time_weight(times, flow_config.velocity_weighting,
                                   flow_config.velocity_weight_loc,
                                   flow_config.velocity_weight_scale)
  segments = loss_segments(batch, flow_config)
  vel_loss = flowception.velocity_loss(velocity, x1 - x0, batch['flow_mask'], weight, segments)
  autoregressive = method in baselines.AUTOREGRESSIVE_METHODS
  rate_fn = baselines.end_loss if autoregressive else flowception.rate_loss
  rate_loss = rate_fn(log_rate, batch['insert_targets'], batch['rate_mask'], segments)
  loss = vel_loss + flow_config.rate_weight * rate_loss
  mean = lambda x: flowception.masked_mean(x, batch['rate_mask'])
  aux = {'velocity_loss': vel_loss, 'rate_loss': rate_loss}
  if autoregressive:
    aux.update(end_probability=mean(jax.nn.sigmoid(log_rate)),
               end_share=mean(batch['insert_targets'] == 0))
  else:
    aux.update(mean_rate=mean(jnp.exp(jnp.minimum(log_rate, flowception.MAX_LOG_RATE))),
               mean_target=mean(batch['insert_targets']))
  return loss, aux


def loss_terms(flow_config) -> tuple[tuple[str, str, float], ...]:
  """The terms of `compute_losses`' loss: (aux name, the batch mask it averages over, weight)."""
  return (('velocity_loss', 'flow_mask', 1.0), ('rate_loss', 'rate_mask', flow_config.rate_weight))


def accumulate_gradients(params, batch: dict[str, jax.Array], key: jax.Array, *, model: nn.Module,
                         config):
  """(loss, aux, gradients) of `batch` computed as `config.grad_accum_steps` microbatches.

  The result is that of the whole batch at once: microbatch i holds examples i, i + k, ... (so it
  spreads over every device), draws from the same per-example keys, and weighs each loss term by its
  share of the frames (or clips, `flow.loss_normalisation`) that the term averages over in the
  whole batch.
  """
  steps = config.grad_accum_steps
  keys = jax.random.split(key, batch['frame_mask'].shape[0])
  losses = functools.partial(compute_losses, model=model, flow_config=config.flow,
                             num_classes=config.num_classes, method=config.method,
                             packed=config.data.get('packing', False))
  if steps == 1:
    (loss, aux), grads = jax.value_and_grad(losses, has_aux=True)(params, batch, keys)
    return loss, aux, grads
  terms = loss_terms(config.flow)
  counts = lambda b, mask: jnp.maximum(
      flowception.mean_count(b[mask], loss_segments(b, config.flow)), 1.0)
  totals = {mask: counts(batch, mask) for _, mask, _ in terms}

  def split(x):
    x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))

  def objective(params, micro, micro_keys):
    _, aux = losses(params, micro, micro_keys)
    shares = {name: counts(micro, mask) / totals[mask] for name, mask, _ in terms}
    loss = sum(weight * shares[name] * aux[name] for name, _, weight in terms)
    return loss, (aux, shares)

  def accumulate(carry, xs):
    (loss, (aux, shares)), grads = jax.value_and_grad(objective, has_aux=True)(params, *xs)
    # Loss terms add up by their shares; other metrics are averaged over microbatches.
    aux = {k: v * shares[k] if k in shares else v / steps for k, v in aux.items()}
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  micro = jax.tree.map(split, (batch, keys))
  aux_shapes = jax.eval_shape(losses, params, *jax.tree.map(lambda x: x[0], micro))[1]
  zeros = (jnp.zeros((), jnp.float32),
           jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes),
           jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
  return loss, aux, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay at `step`: `min(decay, (1 + step) / (10 + step))`.

  The warm-up keeps the average near the current weights early on, so samples of a short run are
  not dragged towards the random initialisation (which a constant 0.999 still weighs by e^-1 after
  1000 steps).
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, config) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Randomness comes from the seed folded with the step, so resumes repeat it."""
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  loss, aux, grads = accumulate_gradients(state.params, batch, key, model=model, config=config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params,
                                       1.0 - ema_decay(state.step, config.optim.ema_decay))
  frame_mask = batch['frame_mask']
  clips = flowception.mean_count(frame_mask, batch['segment_ids'])
  lengths = jnp.broadcast_to(batch['length'].reshape(frame_mask.shape[0], -1), frame_mask.shape)
  metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params),
                 visible_frames=jnp.sum(frame_mask) / clips,
                 visible_share=jnp.sum(jnp.where(frame_mask, 1.0 / lengths, 0.0)) / clips,
                 clips_per_row=clips / frame_mask.shape[0],
                 slot_fill=jnp.mean(frame_mask.astype(jnp.float32)))
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                         opt_state=opt_state)
  return new_state, metrics


def build(config, info: datasets.SourceInfo):
  """The model, the optimizer and `init_fn(key) -> TrainState` (boxed) of a resolved config."""
  model = model_lib.build_for(config, info)
  tx = make_optimizer(config.optim, config.total_steps)
  init_fn = functools.partial(init_state, model, tx, info=info, frames=min(config.data.buckets))
  return model, tx, init_fn


def resolve(config: ml_collections.ConfigDict, source, info: datasets.SourceInfo):
  """The config with the source's facts filled in (class count, pixels or latents, and for the
  full-sequence method the data's length distribution, which its sampler draws from); checked."""
  baselines.check_method(config)
  baselines.check_context_patterns(config)
  packed = config.data.get('packing', False)
  if config.model.get('attention') == 'splash' and (
      packed or config.method in baselines.AUTOREGRESSIVE_METHODS):
    raise ValueError('--config.model.attention=splash takes no frame-level mask, and this run '
                     f'makes one (method {config.method}, data.packing {packed}); use dense or '
                     'blockwise')
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes = info.num_classes
  config.pixels = info.pixels
  if config.method == 'full_sequence':
    config.length_distribution = baselines.length_distribution(source, info.max_frames)
  h, w, _ = info.frame_shape
  if h % config.model.patch_size or w % config.model.patch_size:
    raise ValueError(f'frame size {h}x{w} is not divisible by model.patch_size '
                     f'{config.model.patch_size}; set --config.model.patch_size to a divisor')
  return config


def state_layout(init_fn, mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
  """The unboxed abstract train state (with shardings attached) and its shardings."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  sharding.check_divisible(abstract, shardings)
  return abstract, shardings


def init_sharded(init_fn, mesh: jax.sharding.Mesh, shardings: TrainState,
                 key: jax.Array) -> TrainState:
  """A fresh train state whose arrays are created directly with their final shardings."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(key)


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, config,
                   mesh: jax.sharding.Mesh, shardings: TrainState):
  """`train_step` jitted with explicit shardings; the old state's buffers are donated."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, config=config),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def compiled_memory(step_fn, state: TrainState, batch: dict[str, jax.Array], frames: int):
  """Per-device memory analysis of `step_fn` compiled for `batch` padded to `frames` slots.

  The compilation is the one a later call of that shape reuses, so it costs nothing extra.
  """
  def widen(x):
    if x.ndim < 2 or x.shape[1] != batch['frame_mask'].shape[1]:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(x.shape[:1] + (frames,) + x.shape[2:], x.dtype, sharding=x.sharding)
  return step_fn.lower(state, jax.tree.map(widen, batch)).compile().memory_analysis()


def log_memory(memory, state_bytes: int, frames: int) -> None:
  mib = lambda b: f'{b / 2**20:.1f} MiB'
  logging.info('train step per device (bucket %d): state %s, arguments %s, outputs %s, '
               'temporaries %s, code %s', frames, mib(state_bytes),
               mib(memory.argument_size_in_bytes), mib(memory.output_size_in_bytes),
               mib(memory.temp_size_in_bytes), mib(memory.generated_code_size_in_bytes))


def device_bytes(tree) -> int:
  """Bytes of `tree`'s arrays held by one device (the largest share)."""
  per_device = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so a preempted run saves before it exits.

  Pods send SIGTERM to every host, but not at the same instant: `agreed` makes the processes stop
  at the same point, so that they save the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self, synced: bool) -> bool:
    """Whether the run stops here: some process got SIGTERM. Every process calls it at the same
    points. Several processes compare their flags only where `synced` (all of them just waited for
    the same step, so the exchange holds up no dispatch); a single process just reads its flag."""
    if jax.process_count() == 1:
      return self.requested
    return synced and distributed.any_process(self.requested)

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       make_evaluators: Callable[..., dict[str, Any]] | None = None,
                       step_hook: Callable[[int, TrainState], bool] | None = None,
                       save_steps: Collection[int] = ()) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  `make_evaluators(config, info, model, workdir)`, if given, returns evaluators by name, each with
  `every` (steps between runs; 0: only at the last step) and `run(step, params)` returning scalars
  and uint8 [H, W, 3] images, logged under its name. `step_hook(step, state)`, if given, runs after
  every step's logging and checkpointing (and before the evaluators), inside the mesh context;
  returning True ends the run there, without a further save (learning-curve studies time and
  evaluate runs through it). `save_steps` are saved besides every `checkpoint_every` steps and the
  last one (a study saves the steps it evaluates, so that a stopped study resumes from them).
  """
  # ---- Data source and config -------------------------------------------------------------------
  source, info = datasets.make_source(config.data)
  config = resolve(config, source, info)
  distributed.check_same('config or workdir', {'config': config.to_dict(), 'workdir': workdir})
  checkpoint.check_writable(workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # ---- Mesh ------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  local_batch_size = sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  shard = sharding.data_shard(mesh)
  logging.info('mesh %s over %d devices, %d processes; this process loads data shard %d of %d',
               dict(mesh.shape), mesh.size, jax.process_count(), *shard)

  # ---- Input pipeline --------------------------------------------------------------------------
  dataset = input_pipeline.make_train_dataset(source,
                                              config.data,
                                              config.flow,
                                              batch_size=local_batch_size,
                                              seed=config.seed,
                                              max_frames=info.max_frames,
                                              method=config.method,
                                              shard=shard,
                                              context_config=config.context,
                                              pixels=info.pixels)
  data_iterator = iter(dataset)

  # ---- Model, optimizer and sharded initialisation ----------------------------------------------
  model, tx, init_fn = build(config, info)
  init_key = jax.random.key(config.seed)
  abstract_state, state_shardings = state_layout(init_fn, mesh)
  limit = memory.device_limit()
  if config.check_memory and limit is not None:  # CPUs report no limit.
    memory.check_fits(memory.estimate(config, info, dict(mesh.shape), model=model,
                                      init_fn=init_fn), limit)

  # ---- Checkpoint: resume from the workdir, or start from scratch --------------------------------
  manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, abstract_state, data_iterator, config, workdir)
  if restored is not None:
    latest, state = restored
    logging.info('resumed from step %d in %s', latest, workdir)
  else:
    latest, state = None, init_sharded(init_fn, mesh, state_shardings, init_key)
  evaluators = make_evaluators(config, info, model, workdir) if make_evaluators else {}
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  for line in run_log.config_summary(config, info, num_params,
                                     {name: e.every for name, e in evaluators.items()}):
    logging.info('%s', line)

  # ---- Update step and evaluators ----------------------------------------------------------------
  step_fn = jit_train_step(model, tx, config, mesh, state_shardings)

  def evaluate(step: int) -> None:
    """Runs the evaluators due at `step` (each at its `every`, and all at the last step)."""
    for name, evaluator in evaluators.items():
      if step != config.total_steps and not (evaluator.every and step % evaluator.every == 0):
        continue
      with progress.paused():
        results = evaluator.run(step, state.ema_params)
      images = {f'{name}/{k}': v[None] for k, v in results.items() if np.ndim(v) == 3}
      writer.write_scalars(step, {f'{name}/{k}': v for k, v in results.items() if np.ndim(v) == 0})
      if images:
        writer.write_images(step, images)

  # ---- Loop --------------------------------------------------------------------------------------
  first_step = int(state.step)
  writer.write_hparams({'num_params': num_params, 'start_step': first_step})
  progress = run_log.Progress(config.total_steps, first_step)
  hooks = []
  if config.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.profile_steps, profile_duration_ms=None,
        first_profile=first_step + config.profile_first_step, every_secs=None))
  pending_metrics: list[dict[str, jax.Array]] = []
  last_saved = latest

  def check_and_log(step: int) -> None:
    """Fetches buffered metrics; stops before any save if a loss went non-finite."""
    fetched = jax.device_get(pending_metrics)
    pending_metrics.clear()
    for offset, m in enumerate(fetched):
      if not np.isfinite(m['loss']):
        bad = step - len(fetched) + offset + 1
        raise FloatingPointError(
            f'non-finite loss at step {bad}; the last good checkpoint (step {last_saved}) in '
            f'{workdir} is kept. Lower --config.optim.learning_rate or --config.optim.grad_clip '
            'and run the same command again to resume from it')
    if fetched:
      scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      writer.write_scalars(step, scalars | progress.update(step))  # Timed after the fetch.

  def save_step(step: int) -> None:
    """Starts the asynchronous checkpoint of `step`."""
    nonlocal last_saved
    with progress.paused():
      checkpoint.save(manager, step, state, data_iterator, config)
    logging.info('checkpoint of step %d: writing %s/%d', step, manager.directory, step)
    last_saved = step

  def stop(step: int, synced: bool) -> bool:
    """Whether a SIGTERM (to any process) ends the run at `step`, looked up after each wait (where
    the signal usually lands). If so, `step` is saved (unless it already is) and that save is
    complete before the warning names it."""
    if not preemption.agreed(synced):
      return False
    if last_saved != step:
      check_and_log(step)
      save_step(step)
    checkpoint.wait(manager)
    logging.warning('SIGTERM: saved step %d in %s/%d and exiting; the same command resumes', step,
                    manager.directory, step)
    return True

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), \
        metric_writers.ensure_flushes(writer), _Preemption() as preemption:
      for step in range(first_step + 1, config.total_steps + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = sharding.to_global_batch(next(data_iterator), mesh)
          if step == first_step + 1:
            frames = input_pipeline.max_slots(config.data, config.method)
            log_memory(compiled_memory(step_fn, state, batch, frames), device_bytes(state), frames)
          state, metrics = step_fn(state, batch)
          pending_metrics.append(metrics)
        for hook in hooks:
          hook(step)
        last = step == config.total_steps
        save = last or step % config.checkpoint_every == 0 or step in save_steps
        evaluating = bool(evaluators) and (last or any(e.every and step % e.every == 0
                                                       for e in evaluators.values()))
        synced = save or evaluating or step % config.log_every == 0
        if synced:
          check_and_log(step)  # Blocks until `step` is computed, so pauses below time no steps.
        if save:
          save_step(step)
        if stop(step, synced):
          break
        if step_hook is not None and (step_hook(step, state) or stop(step, synced)):
          break
        if evaluating:
          evaluate(step)
          if stop(step, synced):
            break
  finally:
    with _Preemption():  # A SIGTERM now lets the save in flight finish; the run ends anyway.
      checkpoint.wait(manager)  # A failing run still completes its last good save.
    manager.close()
  return state
