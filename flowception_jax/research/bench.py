r"""Benchmark: Flowception against full-sequence flow matching, side by side in one process.

  python -m flowception_jax.research.bench --config=configs/bench.py --output=/tmp/bench.json

On the current device (CPU, GPU or TPU) it measures, in this order: the FLOP/s of a large float32
matrix product (the peak that utilisation is quoted against); the steady-state train step of the
same model on the same data under both methods (the real pipeline, `train.jit_train_step`); the
samplers (Flowception plain and staged, full-sequence at the same steps and at Flowception's
network evaluations) with their evaluations and FLOPs per generated frame, and the cost model of
the paper's latent setting; the Grain pipeline alone; and the expected cost of the extended-time
recipe for every insertion scheduler and global-time law, by numerical integration and from drawn
examples. With `--workdir`, it instead times a trained model's plain against its staged sampler
(`compare_samplers`, sized by `configs/bench.py:staged`). Times are wall-clock seconds between
blocking fetches, after compilation (reported apart), the median over `bench.train_passes` train
passes or `bench.repeats` sampler runs. On a shared machine absolute times are
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
from jax.extend import core as jax_core
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from flowception_jax.core import flowception
from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax.core import sampler as sampler_lib
from flowception_jax.core import staged_sampler
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


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One matrix product of a traced step: its operands' shapes and dtypes and its `dot_general`
  parameters."""
  lhs: jax.ShapeDtypeStruct
  rhs: jax.ShapeDtypeStruct
  dimension_numbers: Any
  preferred_element_type: Any

  @property
  def flops(self) -> int:
    """2 x its multiply-adds: every lhs element times the rhs's free (non-contracted, non-batch)
    extent."""
    (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
    free = [d for i, d in enumerate(self.rhs.shape) if i not in rhs_contract + rhs_batch]
    return 2 * int(np.prod(self.lhs.shape)) * int(np.prod(free))


def step_matmuls(jaxpr) -> list[Matmul]:
  """Every `dot_general` of a (closed) jaxpr, those of nested jaxprs (jit, remat, custom rules)
  included once each."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
      found.append(Matmul(lhs, rhs, eqn.params['dimension_numbers'],
                          eqn.params.get('preferred_element_type')))
  return found + [m for sub in jax_core.subjaxprs(jaxpr) for m in step_matmuls(sub)]


def matmul_ceiling(matmuls: list[Matmul]) -> Callable[[int], list[float]]:
  """A probe of the FLOP/s the step's own matrix products reach run alone, back to back in one
  compiled function on random operands (each its own, so none is shared or folded away):
  `probe(repeats)` times it `repeats` times."""
  keys = jax.random.split(jax.random.key(0), 2 * len(matmuls))
  operands = [(jax.random.normal(keys[2 * i], m.lhs.shape).astype(m.lhs.dtype),
               jax.random.normal(keys[2 * i + 1], m.rhs.shape).astype(m.rhs.dtype))
              for i, m in enumerate(matmuls)]

  def products(operands):
    return [jax.lax.dot_general(a, b, m.dimension_numbers,
                                preferred_element_type=m.preferred_element_type)
            for (a, b), m in zip(operands, matmuls)]

  compiled = jax.jit(products).lower(operands).compile()
  jax.block_until_ready(compiled(operands))
  flops = sum(m.flops for m in matmuls)
  return lambda repeats: [flops / timed(lambda: compiled(operands))[0] for _ in range(repeats)]


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
  ceiling: Callable[[int], list[float]]  # `matmul_ceiling` probe of a step of the largest bucket.
  matmul_flops: int  # The matrix-product FLOPs of that step's jaxpr (forward and backward).


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
    matmuls = step_matmuls(jax.make_jaxpr(step_fn)(state, firsts[largest]))
  return TrainBench(config=config, model=model, batches=batches, compiled=compiled, state=state,
                    compile_s=compile_s, xla_flops=xla_flops, profile=profile,
                    ceiling=matmul_ceiling(matmuls),
                    matmul_flops=sum(m.flops for m in matmuls))


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


def forward_xla_flops(model: model_lib.DiT, params, frames: int, info) -> float:
  """XLA's FLOP count (its cost analysis: matrix products and elementwise work) of one forward
  pass of `model` on one example of `frames` slots."""
  inputs = model_lib.init_inputs(tuple(info.frame_shape), frames, info.num_classes)
  compiled = jax.jit(model.apply).lower({'params': params}, *inputs).compile()
  return float(compiled.cost_analysis().get('flops', np.nan))


def _evaluations_per_call(config, num_classes: int) -> int:
  """Network evaluations per sampler iteration: x2 under guidance, x2 for Heun."""
  guided = config.sampler.guidance_scale != 1.0 or config.sampler.rate_guidance != 1.0
  return (2 if num_classes and guided else 1) * (2 if config.sampler.solver == 'heun' else 1)


def bench_sample(model, config, info, params, num_videos: int, repeats: int) -> dict[str, Any]:
  """Compiles and times `config.method`'s sampler (staged if `config.sampler.staged`) on
  `num_videos` videos in one batch; the median of `repeats` runs. Run `i` draws from the same
  keys whatever the sampler, so plain and staged Flowception make the same videos.

  Counts the network evaluations the runs made: rows of [capacity]-slot examples, each an
  iteration of one video's buffer (idle rows of finished or padded videos included). FLOPs per
  generated frame weigh each row by `forward_flops` at its capacity (analytic) and by XLA's count
  of that forward pass (`forward_xla_flops`).
  """
  sampler = inference.VideoSampler(model, config, info, batch_size=num_videos)
  labels = sampler.random_labels(jax.random.key(1), num_videos)
  if sampler.staged:
    compile_s, _ = timed(lambda: sampler.fn.compile(params, labels is not None))

    def run(key):
      out, calls = sampler.fn.run(params, sampler_lib.video_keys(key, num_videos), labels)
      return out, [(c.capacity, c.loops * num_videos) for c in calls]
  else:
    compile_s, compiled = timed(
        lambda: sampler.fn.lower(params, jax.random.key(0), labels).compile())

    def run(key):
      out = jax.device_get(compiled(params, key, labels))
      return out, [(info.max_frames, int(out.num_iterations) * num_videos)]

  run(jax.random.key(0))
  runs = [timed(lambda: run(jax.random.key(2 + i))) for i in range(repeats)]
  per_eval = _evaluations_per_call(config, info.num_classes)
  rows = [sum(r for _, r in calls) for _, (_, calls) in runs]
  frames = [int(np.sum(out.lengths)) for _, (out, _) in runs]
  capacities = sorted({c for _, (_, calls) in runs for c, _ in calls})
  analytic = {c: forward_flops(model, c, info.frame_shape) for c in capacities}
  xla = {c: forward_xla_flops(model, params, c, info) for c in capacities}
  per_frame = lambda flops: float(np.median([per_eval * sum(r * flops[c] for c, r in calls) / n
                                             for (_, (_, calls)), n in zip(runs, frames)]))
  # Frame evaluations a sampler computing only alive frames would make, per generated frame:
  # a frame takes part from its `insert_step` to the last iteration.
  alive_evals = [np.where(out.insert_step >= 0, int(out.num_iterations) - out.insert_step, 0).sum()
                 for _, (out, _) in runs]
  return {'s': statistics.median(s for s, _ in runs), 'compile_s': compile_s,
          'nfe': float(np.median(rows)) * per_eval / num_videos,
          'flops_per_frame': per_frame(analytic), 'xla_flops_per_frame': per_frame(xla),
          'mean_length': float(np.mean(frames)) / num_videos,
          'alive_evals_per_frame': float(np.sum(alive_evals) / np.sum(frames))}


def sampling_cost_model(model: model_lib.DiT, frame_shape: tuple[int, int, int],
                        lengths: np.ndarray, *, num_start_frames: int, num_steps: int,
                        kappa: str, stages: tuple[int, ...], batch_size: int,
                        seed: int = 0) -> dict[str, float]:
  """Analytic matrix FLOPs per generated frame of each sampler, for videos of `lengths` drawn
  by the Flowception process with its true rates (a perfectly trained model).

  Each of a video's `L - num_start_frames` missing frames enters at a global time drawn from the
  scheduler (`kappa.inverse`) and then runs `num_steps` iterations, so a video runs until its last
  frame is clean. The plain sampler evaluates `N_max = max(stages)` slots per video until the last
  video of its batch of `batch_size` ends; the staged one each video's iterations in the smallest
  stage that holds its frames (its idle rows and moves left out: a lower bound); full-sequence
  flow matching `num_steps` evaluations of `N_max` slots. Returns FLOPs per frame and the
  iterations per video of each.
  """
  rng = np.random.default_rng(seed)
  kappa_fn = flowception.get_kappa(kappa)
  capacity = stages[-1]
  stage_flops = {c: forward_flops(model, c, frame_shape) for c in stages}
  stage_of = lambda n: next(c for c in stages if c >= min(n, capacity))
  staged, finish = [], []
  for length in lengths:
    missing = max(int(length) - num_start_frames, 0)
    enter = np.ceil(np.asarray(kappa_fn.inverse(rng.uniform(size=missing))) * num_steps)
    last = int(enter.max()) if missing else 0
    iterations = last + num_steps
    alive = num_start_frames + np.searchsorted(np.sort(enter), np.arange(iterations), 'right')
    staged.append(sum(stage_flops[stage_of(int(n))] for n in alive))
    finish.append(iterations)
  finish = np.asarray(finish)
  batches = [finish[i:i + batch_size] for i in range(0, len(finish), batch_size)]
  plain_rows = sum(int(b.max()) * len(b) for b in batches)
  frames = float(np.sum(lengths))
  return {
      'plain_flops_per_frame': plain_rows * stage_flops[capacity] / frames,
      'staged_flops_per_frame': float(np.sum(staged)) / frames,
      'full_sequence_flops_per_frame': len(lengths) * num_steps * stage_flops[capacity] / frames,
      'plain_iterations': plain_rows / len(lengths),
      'staged_iterations': float(finish.mean()),
  }


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


def _with_sampler(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of `config` with `config.sampler` fields set."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.sampler.update(fields)
  return config


def latent_sampling_cost(bench: ml_collections.ConfigDict) -> dict[str, float]:
  """`sampling_cost_model` in the paper's latent setting: its DiT (38 blocks of width 1536, 24
  heads, patch 1) on LTX-Video latents of 256-pixel videos (8x8x128), clips of 3 to 19 latent
  frames (17 to 145 frames), two start frames, the linear scheduler, default stages."""
  model = model_lib.DiT(patch_size=1, channels=128, hidden_size=1536, depth=38, num_heads=24)
  lengths = np.random.default_rng(0).integers(3, 20, size=bench.latent_videos)
  figures = sampling_cost_model(
      model, (8, 8, 128), lengths, num_start_frames=2, num_steps=bench.latent_num_steps,
      kappa='linear', stages=staged_sampler.default_stages(2, 19), batch_size=bench.sample_batch)
  figures['staged_cost_ratio'] = (figures['staged_flops_per_frame']
                                  / figures['full_sequence_flops_per_frame'])
  figures['plain_cost_ratio'] = (figures['plain_flops_per_frame']
                                 / figures['full_sequence_flops_per_frame'])
  return figures


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
  ceilings = []  # The Flowception step's own matrix products alone, probed like the peak.
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    for _ in range(bench.train_passes):
      for m in methods:
        passes[m].append(train_pass(benches[m]))
      peaks += peak_flops(bench.peak_size, 1)  # Between the passes, under the same load.
      ceilings += benches['flowception'].ceiling(1)
  runs = {m: train_figures(benches[m], passes[m], info) for m in methods}
  peak, ceiling = statistics.median(peaks), statistics.median(ceilings)
  flow, full = runs['flowception'], runs['full_sequence']
  largest = str(max(flow['buckets']))
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
      'train.matmul_ceiling_flops': ceiling,
      'train.mfu_own_ceiling': flow['flops_per_s_by_bucket'][largest] / ceiling,
      'train.mfu_largest_bucket': flow['flops_per_s_by_bucket'][largest] / peak,
      'train.step_matmul_flops': benches['flowception'].matmul_flops,
      'train.step_model_flops': (benches['flowception'].config.batch_size
                                 * train_flops(benches['flowception'].model, int(largest),
                                               info.frame_shape)),
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
  flow_config, full_config = benches['flowception'].config, benches['full_sequence'].config
  samplers = {'flowception': _with_sampler(flow_config, staged=False),
              'flowception_staged': _with_sampler(flow_config, staged=True),
              'full_sequence': full_config}
  samples = {name: bench_sample(model, c, info, params, bench.sample_videos, bench.repeats)
             for name, c in samplers.items()}
  per_eval = _evaluations_per_call(flow_config, info.num_classes)
  matched_steps = max(1, round(samples['flowception']['nfe'] / per_eval))
  samples['full_sequence_matched_nfe'] = bench_sample(
      model, _with_sampler(full_config, num_steps=matched_steps), info, params,
      bench.sample_videos, bench.repeats)
  for name, s in samples.items():
    results.update({f'sample.{name}_{k}': s[k] for k in (
        's', 'nfe', 'flops_per_frame', 'xla_flops_per_frame', 'mean_length')})
  for name in ('flowception', 'flowception_staged'):
    results[f'sample.{name}_alive_evals_per_frame'] = samples[name]['alive_evals_per_frame']
  results['sample.compile_s'] = sum(s['compile_s'] for s in samples.values())
  results['sample.speed_ratio'] = samples['full_sequence']['s'] / samples['flowception']['s']
  results['sample.staged_speed_ratio'] = (samples['flowception']['s']
                                          / samples['flowception_staged']['s'])
  results['sample.matched_nfe_speed_ratio'] = (samples['full_sequence_matched_nfe']['s']
                                               / samples['flowception_staged']['s'])
  results['sample.matched_nfe_steps'] = matched_steps
  results['sample.num_videos'] = bench.sample_videos
  results['sample.num_steps'] = config.sampler.num_steps
  results.update({f'sample.latent.{k}': v for k, v in latent_sampling_cost(bench).items()})

  logging.info('timing the input pipeline; drawing the extended-time study')
  results['data.examples_per_s'] = bench_data(benches['flowception'].config, source, info,
                                              bench.data_batches)
  results['data.train_examples_per_s'] = 1.0 / flow['s_per_example']
  for name, figures in recipe_cost.recipe_study(config, source, info, bench.study_examples).items():
    results.update({f'recipe.{name}.{k}': v for k, v in figures.items()})
  return results


# ---- Staged against plain sampling of a trained model -------------------------------------------

def _plain_slot_evaluations(out, num_steps: int, batch_size: int, capacity: int) -> int:
  """Frame slots the plain sampler evaluates: every batch runs until its last video ends, when
  the last frame inserted (at the latest step an alive frame entered) has had `num_steps` steps."""
  finish = np.max(out.insert_step, axis=1) + num_steps
  return sum(int(finish[i:i + batch_size].max()) * batch_size * capacity
             for i in range(0, len(finish), batch_size))


def _plain_and_staged(trained: inference.TrainedModel, config: ml_collections.ConfigDict,
                      batch_size: int) -> tuple[inference.VideoSampler, inference.VideoSampler]:
  """The trained config's `VideoSampler`s, plain and staged (with `config.sampler`'s stages)."""
  return tuple(inference.VideoSampler(
      trained.model, _with_sampler(trained.config, staged=staged,
                                   stages=tuple(config.sampler.stages),
                                   min_running=config.sampler.min_running),
      trained.info, batch_size=batch_size) for staged in (False, True))


def _wall_and_cpu_seconds(fn: Callable[[], Any]) -> tuple[float, float, Any]:
  """Wall-clock and CPU seconds (all threads of this process) of `fn()`, and its result."""
  cpu = time.process_time()
  seconds, out = timed(fn)
  return seconds, time.process_time() - cpu, out


def compare_samplers(trained: inference.TrainedModel, config: ml_collections.ConfigDict,
                     num_videos: int, batch_size: int, repeats: int) -> dict[str, Any]:
  """Times the plain and the staged sampler of `trained` on `num_videos` videos, interleaved.

  Both are `inference.VideoSampler`s with `batch_size` videos per batch (`_plain_and_staged`); the
  staged loop is called through `StagedSampler.run`, as `VideoSampler` calls it, to count its
  loops. Each repeat runs both on one key, so they must make the same videos: the largest frame
  difference and whether the lengths agree are reported with the median wall-clock and CPU
  times, their ratios, the compile times and the ratio of the frame slots each evaluates. CPU
  time counts only this process, so it is the steadier figure on a machine shared with others.
  """
  batch_size = min(batch_size, num_videos)
  plain, staged = _plain_and_staged(trained, config, batch_size)
  params, num_steps = trained.params, plain.config.sampler.num_steps
  labels = plain.random_labels(jax.random.key(0), num_videos)
  # `labels` by keyword, as `VideoSampler` passes it: the runs then reuse this compilation.
  compile_plain, _ = timed(lambda: plain.fn.lower(
      params, jax.random.key(0), labels=None if labels is None else labels[:batch_size]).compile())
  compile_staged, _ = timed(lambda: staged.fn.compile(params, labels is not None))
  runs = collections.defaultdict(list)
  for repeat in range(repeats):
    key = jax.random.key(repeat + 1)
    wall, cpu, out_plain = _wall_and_cpu_seconds(
        lambda: plain(params, key, num_videos, labels=labels))
    runs['plain_s'].append(wall)
    runs['plain_cpu_s'].append(cpu)
    wall, cpu, (out, calls) = _wall_and_cpu_seconds(
        lambda: staged.fn.run(params, staged.keys_by_batch(key, num_videos), labels))
    runs['staged_s'].append(wall)
    runs['staged_cpu_s'].append(cpu)
    logging.info('repeat %d: plain %.1f s, staged %.1f s', repeat, runs['plain_s'][-1], wall)
    runs['slot_ratio'].append(
        _plain_slot_evaluations(out_plain, num_steps, batch_size, trained.info.max_frames)
        / sum(c.loops * batch_size * c.capacity for c in calls))
    runs['row_use'].append(sum(c.video_steps for c in calls)
                           / sum(c.loops * batch_size for c in calls))
    runs['frame_difference'].append(float(np.max(np.abs(out_plain.frames - out.frames))))
    runs['same_lengths'].append(bool(np.array_equal(out_plain.lengths, out.lengths)))
    runs['calls'].append(len(calls))
  median = {k: statistics.median(v) for k, v in runs.items()}
  return {
      'staged.num_videos': num_videos, 'staged.batch_size': batch_size,
      'staged.num_steps': num_steps, 'staged.stages': list(staged.fn.stages),
      'staged.min_running': config.sampler.min_running,
      **{f'staged.{k}': median[k] for k in ('plain_s', 'staged_s', 'plain_cpu_s', 'staged_cpu_s',
                                            'slot_ratio', 'row_use')},
      'staged.speed_ratio': median['plain_s'] / median['staged_s'],
      'staged.speed_ratios': [p / s for p, s in zip(runs['plain_s'], runs['staged_s'])],
      'staged.cpu_ratio': median['plain_cpu_s'] / median['staged_cpu_s'],
      'staged.plain_compile_s': compile_plain, 'staged.staged_compile_s': compile_staged,
      'staged.speed_ratio_with_compile': ((median['plain_s'] + compile_plain)
                                          / (median['staged_s'] + compile_staged)),
      'staged.calls': median['calls'],
      'staged.max_frame_difference': max(runs['frame_difference']),
      'staged.same_lengths': all(runs['same_lengths']),
  }


def run_samplers(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`compare_samplers` on the model trained in `workdir`, as `config.bench` sizes it."""
  bench = config.bench
  return compare_samplers(inference.load(workdir), config, bench.sample_videos,
                          bench.sample_batch, bench.repeats)


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
  flags.DEFINE_string('workdir', None, 'A trained Flowception run: time its plain against its '
                      'staged sampler (`compare_samplers`) instead of the whole benchmark.')
  flags.mark_flags_as_required(['config', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  output = flags.FLAGS.output
  directory = os.path.dirname(files.absolute(output))
  if not files.is_remote(output) and not os.path.isdir(directory):
    raise app.UsageError(f'the folder of --output={output} does not exist; create it first')
  if flags.FLAGS.workdir:
    results = run_samplers(flags.FLAGS.config, flags.FLAGS.workdir)
  else:
    results = run(flags.FLAGS.config)
  print(format_table(results))
  files.write_json(output, results)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
