"""The Flowception trainer: one linear loop from mesh and data to checkpoints and sample GIFs."""

import functools
import os
import signal
from typing import Any

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

from flowception_jax import checkpoint
from flowception_jax import data
from flowception_jax import datasets
from flowception_jax import flowception
from flowception_jax import inference
from flowception_jax import sharding
from flowception_jax import video_io


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
  params = inference.init_params(model, info, frames, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


def compute_losses(params, batch: dict[str, jax.Array], key: jax.Array, *, model: nn.Module,
                   flow_config, num_classes: int):
  """Velocity and rate losses of one batch; noise and label dropout drawn from `key`."""
  noise_key, drop_key = jax.random.split(key)
  x1 = batch['frames']
  x0 = jax.random.normal(noise_key, x1.shape, x1.dtype)
  times = flowception.snr_shift(batch['frame_times'], flow_config.snr_shift)
  t = times[..., None, None, None]
  x_t = jnp.where(batch['context_mask'][..., None, None, None], x1, t * x1 + (1 - t) * x0)
  labels = None
  if num_classes:
    drop = jax.random.bernoulli(drop_key, flow_config.p_uncond, batch['label'].shape)
    labels = jnp.where(drop, num_classes, batch['label'])
  velocity, log_rate = model.apply({'params': params}, *model_inputs(batch, x_t, times, labels))
  vel_loss = flowception.velocity_loss(velocity, x1 - x0, batch['flow_mask'])
  rate_loss = flowception.rate_loss(log_rate, batch['insert_targets'], batch['rate_mask'])
  loss = vel_loss + flow_config.rate_weight * rate_loss
  rate_mask = batch['rate_mask'].astype(jnp.float32)
  aux = {
      'velocity_loss': vel_loss,
      'rate_loss': rate_loss,
      'mean_rate': jnp.sum(jnp.exp(jnp.minimum(log_rate, flowception.MAX_LOG_RATE)) * rate_mask)
                   / jnp.maximum(jnp.sum(rate_mask), 1.0),
      'mean_target': jnp.sum(batch['insert_targets'] * rate_mask) / jnp.maximum(jnp.sum(rate_mask), 1.0),
  }
  return loss, aux


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
  grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, batch, key, model=model, flow_config=config.flow,
                               num_classes=config.num_classes)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params,
                                       1.0 - ema_decay(state.step, config.optim.ema_decay))
  frame_mask = batch['frame_mask'].astype(jnp.float32)
  metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params),
                 visible_frames=jnp.mean(jnp.sum(frame_mask, axis=1)),
                 visible_share=jnp.mean(jnp.sum(frame_mask, axis=1) / batch['length']),
                 bucket_fill=jnp.mean(frame_mask))
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                         opt_state=opt_state)
  return new_state, metrics


def build(config, info: datasets.SourceInfo):
  """The model, the optimizer and `init_fn(key) -> TrainState` (boxed) of a resolved config."""
  model = inference.build_model(config, info)
  tx = make_optimizer(config.optim, config.total_steps)
  init_fn = functools.partial(init_state, model, tx, info=info, frames=min(config.data.buckets))
  return model, tx, init_fn


def resolve(config: ml_collections.ConfigDict, info: datasets.SourceInfo):
  """The config with the source's facts (class count, pixels or latents) filled in; checked."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes = info.num_classes
  config.pixels = info.pixels
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


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so a preempted run saves before it exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  # ---- Data source and config -------------------------------------------------------------------
  source, info = datasets.make_source(config.data)
  config = resolve(config, info)
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # ---- Mesh ------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  local_batch_size = sharding.check_batch_size(config.batch_size, mesh)
  logging.info('mesh %s over %d devices, %d processes', dict(mesh.shape), mesh.size,
               jax.process_count())

  # ---- Input pipeline --------------------------------------------------------------------------
  dataset = data.make_train_dataset(source, config.data, config.flow, batch_size=local_batch_size,
                                    seed=config.seed, max_frames=info.max_frames,
                                    pixels=info.pixels)
  data_iterator = iter(dataset)

  # ---- Model, optimizer and sharded initialisation ----------------------------------------------
  model, tx, init_fn = build(config, info)
  init_key = jax.random.key(config.seed)
  abstract_state, state_shardings = state_layout(init_fn, mesh)

  # ---- Checkpoint: resume from the workdir, or start from scratch --------------------------------
  manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None:
    checkpoint.check_compatible(checkpoint.restore_config(manager, latest), config, workdir)
    state = checkpoint.restore(manager, latest, abstract_state, data_iterator)
    logging.info('resumed from step %d in %s', latest, workdir)
  else:
    state = init_sharded(init_fn, mesh, state_shardings, init_key)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('model %s: %.2fM parameters', config.model.size, num_params / 1e6)

  # ---- Update step and sampler -------------------------------------------------------------------
  step_fn = jit_train_step(model, tx, config, mesh, state_shardings)
  sampler = inference.make_sampler(model, config, info, config.num_sample_videos)

  def write_samples(step: int) -> None:
    key = jax.random.fold_in(jax.random.key(config.seed + 1), step)
    labels = inference.sample_labels(key, config.num_sample_videos, info.num_classes)
    out = sampler(state.ema_params, key, labels=labels)
    lengths = np.asarray(out.lengths)
    if not info.pixels:  # Latents: saved for an external decoder; no GIF, no pixel metrics.
      if jax.process_index() == 0:
        inference.save_latents(os.path.join(workdir, f'samples_{step:06d}.npz'),
                               inference.to_latents(out.frames, lengths), lengths)
      writer.write_scalars(step, {'sample/mean_length': float(lengths.mean())})
      return
    videos = inference.to_pixels(out.frames, lengths)
    if jax.process_index() == 0:
      video_io.write_gif(os.path.join(workdir, f'samples_{step:06d}.gif'),
                         video_io.video_grid(videos, lengths))
    metrics = datasets.task_metrics(config.data.name, videos, lengths, config.data)
    metrics['mean_length'] = float(lengths.mean())
    writer.write_scalars(step, {f'sample/{k}': v for k, v in metrics.items()})

  # ---- Loop --------------------------------------------------------------------------------------
  first_step = int(state.step)
  writer.write_hparams({'num_params': num_params, 'start_step': first_step})
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
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
      writer.write_scalars(step, {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]})

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), \
        metric_writers.ensure_flushes(writer), _Preemption() as preemption:
      for step in range(first_step + 1, config.total_steps + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = sharding.to_global_batch(next(data_iterator), mesh)
          state, metrics = step_fn(state, batch)
          pending_metrics.append(metrics)
        report(step)
        last = step == config.total_steps
        save = last or preemption.requested or step % config.checkpoint_every == 0
        if save or step % config.log_every == 0:
          check_and_log(step)
        if save:
          checkpoint.save(manager, step, state, data_iterator, config)
          last_saved = step
        if preemption.requested:
          logging.warning('SIGTERM: saved step %d, exiting', step)
          break
        if last or (config.sample_every and step % config.sample_every == 0):
          with report.timed('sample'):
            write_samples(step)
  finally:
    manager.wait_until_finished()  # A failing run still completes its last good save.
    manager.close()
  return state
