r"""Benchmark: Flowception against full-sequence flow matching, side by side in one process.

  python -m flowception_jax.research.bench --config=configs/bench.py --output=/tmp/bench.json

On the current device (CPU, GPU or TPU) it measures, in this order: the FLOP/s of a large float32
matrix product (the peak that utilisation is quoted against); the steady-state train step of the
same model on the same data under both methods (the real pipeline, `train.jit_train_step`); both
samplers at the same number of steps; the Grain pipeline alone; and the expected cost of the
extended-time recipe for every insertion scheduler and global-time law, by numerical integration
and from drawn examples. Times are wall-clock seconds between blocking fetches, after compilation
(reported apart), the median over `bench.repeats` passes. On a shared machine absolute times are
inflated; the ratios, taken side by side in one run, are what to read. Prints a table and writes
every figure to `--output` as JSON (keys documented in `docs/benchmark.md`).
"""

import collections
import dataclasses
import glob
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.research import recipe_cost
from flowception_jax.storage import files
from flowception_jax.training import input_pipeline
from flowception_jax.training import sharding
from flowception_jax.training import train

# ---- Analytic FLOP count -------------------------------------------------------------------------


def forward_flops(model: model_lib.DiT, frames: int, frame_shape: tuple[int, int, int]) -> int:
  """Matrix-product FLOPs (2 per multiply-add) of one forward pass of `model` on one example.

  The example has `frames` slots (a bucket: padded slots are computed like real ones) of
  `frame_shape` (H, W, C). Counts every dense layer and both attention products (scores and
  weighted values over all `S x S` token pairs); elementwise work is left out.
  """
  h, w, c = frame_shape
  p, d = model.patch_size, model.hidden_size
  patches = (h // p) * (w // p)
  tokens = frames * len(model_lib.token_grid(h // p, w // p))  # Patches and the rate token.
  mlp = int(d * model.mlp_ratio)
  embed = frames * (patches * (p * p * 2 * c) * d  # Patch embedding of [noisy | context].
                    + model_lib._TIME_FEATURES * d + d * d)  # Time MLP.
  block = (frames * d * 6 * d  # adaLN modulation.
           + tokens * d * (3 * d + d + 2 * mlp)  # QKV, attention output, MLP.
           + 2 * tokens * tokens * d)  # Scores and weighted values.
  heads = frames * (d * 2 * d + patches * d * p * p * c + d * d + d)  # Final adaLN, velocity, rate.
  return 2 * (embed + model.depth * block + heads)


def train_flops(model: model_lib.DiT, frames: int, frame_shape: tuple[int, int, int]) -> int:
  """Forward plus backward matrix-product FLOPs of one example: 3x the forward pass."""
  return 3 * forward_flops(model, frames, frame_shape)


# ---- Timing --------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Wall-clock seconds of `fn()` up to the moment its result is on hand, and the result."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def peak_flops(size: int, repeats: int) -> list[float]:
  """FLOP/s of `repeats` float32 `[size, size] @ [size, size]` products on the default device."""
  keys = jax.random.split(jax.random.key(0), 2)
  a, b = (jax.random.normal(k, (size, size), jnp.float32) for k in keys)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  return [2 * size**3 / timed(lambda: matmul(a, b))[0] for _ in range(repeats)]


def _instruction_kinds(hlo_text: str) -> dict[str, str]:
  """Kind of every instruction of a compiled HLO module, by instruction name.

  'matmul' if it is, or its fused computation holds, a dot or convolution; otherwise its name
  without the trailing number (XLA names fusions after their ops, e.g. 'copy_bitcast_fusion').
  """
  bodies, name = {}, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      name = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  has_dot = {n: any(re.search(r' (dot|convolution)\(', l) for l in b) for n, b in bodies.items()}
  kinds = {}
  for lines in bodies.values():
    for line in lines:
      match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(', line)
      if not match:
        continue
      called = re.search(r'calls=%?([\w.\-]+)', line)
      dot = match.group(2) in ('dot', 'convolution') or (called and has_dot.get(called.group(1)))
      kinds[match.group(1)] = 'matmul' if dot else re.sub(r'\.\d+$', '', match.group(1))
  return kinds


def profile_kinds(compiled, *args) -> dict[str, float]:
  """Share of the time of one `compiled(*args)` spent in each kind of operation.

  From a `jax.profiler` trace: events named after the executable's HLO instructions (on CPU, the
  thunks of its thread pool) are summed per `_instruction_kinds` kind, over all threads.
  """
  kinds = _instruction_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    trace = jax.profiler.ProfileData.from_file(
        glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)[0])
  totals = collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          totals[kinds[event.name]] += event.duration_ns
  whole = sum(totals.values()) or 1
  return {kind: t / whole for kind, t in totals.most_common()}


def _with(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for name, value in fields.items():
    config[name] = value
  return config


def draw_batches(dataset, count: int) -> list[dict[str, np.ndarray]]:
  """The first `count` batches of a pipeline, on the host (so steps time no input work)."""
  iterator = iter(dataset)
  return [next(iterator) for _ in range(count)]


@dataclasses.dataclass
class TrainBench:
  """One method's train step, compiled per bucket, with its batches and its (changing) state."""
  config: ml_collections.ConfigDict
  model: model_lib.DiT
  batches: list[dict[str, jax.Array]]
  compiled: dict[int, Any]  # Bucket size -> the compiled step.
  state: train.TrainState
  compile_s: float
  xla_flops: dict[int, float]  # Bucket size -> XLA's FLOP count of one step.
  profile: dict[str, float]  # `profile_kinds` of a step of the largest bucket.


def _frames(batch) -> int:
  return int(batch['frame_mask'].shape[1])


def prepare_train(config, source, info, mesh, method: str, num_batches: int) -> TrainBench:
  """`method`'s real train step (`train.jit_train_step`) and `num_batches` of its real pipeline.

  Each distinct bucket is compiled ahead of time (`compile_s`, summed), every executable runs
  once to warm up, and a step of the largest bucket is profiled.
  """
  config = train.resolve(_with(config, method=method), source, info)
  model, tx, init_fn = train.build(config, info)
  _, shardings = train.state_layout(init_fn, mesh)
  state = train.init_sharded(init_fn, mesh, shardings, jax.random.key(config.seed))
  step_fn = train.jit_train_step(model, tx, config, mesh, shardings)
  dataset = input_pipeline.make_train_dataset(
      source, config.data, config.flow, batch_size=config.batch_size, seed=config.seed,
      max_frames=info.max_frames, method=method, context_config=config.context,
      pixels=info.pixels)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    batches = [sharding.to_global_batch(b, mesh) for b in draw_batches(dataset, num_batches)]
    compiled, compile_s, xla_flops = {}, 0.0, {}
    for batch in batches:
      if _frames(batch) not in compiled:
        seconds, compiled[_frames(batch)] = timed(lambda: step_fn.lower(state, batch).compile())
        compile_s += seconds
        xla_flops[_frames(batch)] = compiled[_frames(batch)].cost_analysis().get('flops', np.nan)
    firsts = {_frames(b): b for b in reversed(batches)}
    for size, batch in firsts.items():
      state, _ = compiled[size](state, batch)
    largest = max(firsts)
    # Profiled on a copy: the executable donates (deletes) the state it is given.
    profile = profile_kinds(compiled[largest], jax.tree.map(jnp.copy, state), firsts[largest])
  return TrainBench(config=config, model=model, batches=batches, compiled=compiled, state=state,
                    compile_s=compile_s, xla_flops=xla_flops, profile=profile)


def train_pass(bench_state: TrainBench) -> list[float]:
  """Runs every batch once, blocking after each step; the seconds of each step."""
  seconds = []
  for batch in bench_state.batches:
    step = bench_state.compiled[_frames(batch)]
    elapsed, (bench_state.state, _) = timed(lambda: step(bench_state.state, batch))
    seconds.append(elapsed)
  return seconds


def train_figures(bench_state: TrainBench, passes: list[list[float]], info) -> dict[str, Any]:
  """Seconds per example (median pass), per bucket, and the FLOP counts of the batches' buckets."""
  batch_size = bench_state.config.batch_size
  sizes = [_frames(b) for b in bench_state.batches]
  frames = sum(int(np.asarray(b['frame_mask']).sum()) for b in bench_state.batches)
  lengths = sum(int(np.asarray(b['length']).sum()) for b in bench_state.batches)
  by_bucket = {size: statistics.median(t for p in passes for t, s in zip(p, sizes) if s == size)
               / batch_size for size in sorted(set(sizes))}
  flops = lambda size: train_flops(bench_state.model, size, info.frame_shape)
  return {
      's_per_example': statistics.median(sum(p) for p in passes) / (batch_size * len(sizes)),
      's_per_example_by_bucket': {str(k): v for k, v in by_bucket.items()},
      'flops_per_s_by_bucket': {str(k): flops(k) / v for k, v in by_bucket.items()},
      'compile_s': bench_state.compile_s,
      'buckets': sizes,
      'model_flops_per_example': float(np.mean([flops(s) for s in sizes])),
      'xla_flops_per_example': float(np.mean([bench_state.xla_flops[s] for s in sizes]))
                               / batch_size,
      'visible_fraction': frames / lengths,
      'bucket_fill': frames / (batch_size * sum(sizes)),
  }


def bench_sample(model, config, info, params, num_videos: int, repeats: int) -> dict[str, Any]:
  """Compiles and times `config.method`'s sampler on `num_videos` videos; median of `repeats`."""
  sampler = inference.VideoSampler(model, config, info, batch_size=num_videos)
  sample, labels = sampler.fn, sampler.random_labels(jax.random.key(1), num_videos)
  compile_s, compiled = timed(lambda: sample.lower(params, jax.random.key(0), labels).compile())
  jax.block_until_ready(compiled(params, jax.random.key(0), labels))
  runs = [timed(lambda: compiled(params, jax.random.key(2 + i), labels)) for i in range(repeats)]
  runs = [(seconds, jax.device_get(out)) for seconds, out in runs]
  # Frame evaluations a sampler computing only alive frames would make, per generated frame:
  # a frame takes part from its `insert_step` to the last iteration.
  alive_evals = [np.where(out.insert_step >= 0, int(out.num_iterations) - out.insert_step, 0).sum()
                 for _, out in runs]
  per_eval = ((2 if info.num_classes and config.sampler.guidance_scale != 1.0 else 1)
              * (2 if config.sampler.solver == 'heun' else 1))
  return {'s': statistics.median(s for s, _ in runs), 'compile_s': compile_s,
          'nfe': float(np.median([int(out.num_iterations) for _, out in runs])) * per_eval,
          'mean_length': float(np.mean([np.mean(out.lengths) for _, out in runs])),
          'alive_evals_per_frame': float(np.sum(alive_evals)
                                         / np.sum([np.sum(out.lengths) for _, out in runs]))}


def bench_data(config, source, info, num_batches: int) -> float:
  """Examples per second of the Grain pipeline alone, after its first batch (threads started)."""
  dataset = input_pipeline.make_train_dataset(
      source, config.data, config.flow, batch_size=config.batch_size, seed=config.seed + 1,
      max_frames=info.max_frames, method=config.method, context_config=config.context,
      pixels=info.pixels)
  iterator = iter(dataset)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * config.batch_size / (time.perf_counter() - start)


# ---- The whole benchmark -------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every measurement of the benchmark for `config`, as a flat dict of JSON-ready figures."""
  bench = config.bench
  source, info = datasets.make_source(config.data)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  peaks = peak_flops(bench.peak_size, bench.repeats)

  logging.info('peak %.1f GFLOP/s; timing the train steps', statistics.median(peaks) / 1e9)
  methods = ('flowception', 'full_sequence')
  benches = {m: prepare_train(config, source, info, mesh, m, bench.train_batches) for m in methods}
  # Passes alternate between the methods, so that a change of load hits both alike.
  passes = {m: [] for m in methods}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    for _ in range(bench.repeats):
      for m in methods:
        passes[m].append(train_pass(benches[m]))
      peaks += peak_flops(bench.peak_size, 1)  # Between the passes, under the same load.
  runs = {m: train_figures(benches[m], passes[m], info) for m in methods}
  peak = statistics.median(peaks)
  flow, full = runs['flowception'], runs['full_sequence']
  results = {
      'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
      'peak_flops': peak,
      'train.flowception_s_per_example': flow['s_per_example'],
      'train.full_sequence_s_per_example': full['s_per_example'],
      'train.cost_ratio_measured': flow['s_per_example'] / full['s_per_example'],
      'train.cost_ratio_analytic': flow['model_flops_per_example']
                                   / full['model_flops_per_example'],
      'train.model_flops_per_example': flow['model_flops_per_example'],
      'train.full_sequence_model_flops_per_example': full['model_flops_per_example'],
      'train.xla_flops_per_example': flow['xla_flops_per_example'],
      'train.mfu': flow['model_flops_per_example'] / flow['s_per_example'] / peak,
      'train.full_sequence_mfu': full['model_flops_per_example'] / full['s_per_example'] / peak,
      'train.flowception_visible_fraction': flow['visible_fraction'],
      'train.flowception_bucket_fill': flow['bucket_fill'],
      'train.full_sequence_bucket_fill': full['bucket_fill'],
      'train.flowception_buckets': flow['buckets'],
      'train.full_sequence_buckets': full['buckets'],
      'train.flowception_s_per_example_by_bucket': flow['s_per_example_by_bucket'],
      'train.full_sequence_s_per_example_by_bucket': full['s_per_example_by_bucket'],
      'train.flowception_mfu_by_bucket': {k: v / peak for k, v in
                                          flow['flops_per_s_by_bucket'].items()},
      'train.full_sequence_mfu_by_bucket': {k: v / peak for k, v in
                                            full['flops_per_s_by_bucket'].items()},
      'train.compile_s': flow['compile_s'] + full['compile_s'],
      'train.profile_matmul_share': benches['flowception'].profile.get('matmul', 0.0),
      'train.profile_top_other': [[k, round(v, 4)] for k, v in
                                  benches['flowception'].profile.items() if k != 'matmul'][:6],
  }

  params = benches['flowception'].state.ema_params
  logging.info('timing the samplers')
  model = benches['flowception'].model
  samples = {name: bench_sample(model, c, info, params, bench.sample_videos, bench.repeats)
             for name, c in (('flowception', benches['flowception'].config),
                             ('full_sequence', benches['full_sequence'].config))}
  for name, s in samples.items():
    results.update({f'sample.{name}_s': s['s'], f'sample.{name}_nfe': s['nfe'],
                    f'sample.{name}_mean_length': s['mean_length'],
                    f'sample.{name}_alive_evals_per_frame': s['alive_evals_per_frame']})
  results['sample.compile_s'] = sum(s['compile_s'] for s in samples.values())
  results['sample.speed_ratio'] = samples['full_sequence']['s'] / samples['flowception']['s']
  results['sample.num_videos'] = bench.sample_videos
  results['sample.num_steps'] = config.sampler.num_steps

  logging.info('timing the input pipeline; drawing the extended-time study')
  results['data.examples_per_s'] = bench_data(benches['flowception'].config, source, info,
                                              bench.data_batches)
  results['data.train_examples_per_s'] = 1.0 / flow['s_per_example']
  for name, figures in recipe_cost.recipe_study(config, source, info, bench.study_examples).items():
    results.update({f'recipe.{name}.{k}': v for k, v in figures.items()})
  return results


def format_table(results: dict[str, Any]) -> str:
  """The figures of `run` as aligned text lines."""
  lines = []
  for key, value in results.items():
    if isinstance(value, float):
      value = f'{value:.4g}'
    elif isinstance(value, dict):
      value = ' '.join(f'{k}:{v:.4g}' for k, v in value.items())
    elif isinstance(value, list):
      value = ' '.join(f'{v[0]}:{v[1]:.3f}' if isinstance(v, list) else str(v) for v in value)
    lines.append(f'{key:<52} {value}')
  return '\n'.join(lines)


def _define_flags() -> None:
  """The command's flags, defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file('config', None, 'Benchmark config file.', lock_config=True)
  flags.DEFINE_string('output', None, 'JSON file the figures are written to.')
  flags.mark_flags_as_required(['config', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  output = flags.FLAGS.output
  directory = os.path.dirname(files.absolute(output))
  if not files.is_remote(output) and not os.path.isdir(directory):
    raise app.UsageError(f'the folder of --output={output} does not exist; create it first')
  results = run(flags.FLAGS.config)
  print(format_table(results))
  files.write_json(output, results)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
