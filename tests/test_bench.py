"""The benchmark: every figure written end to end, the FLOP count, the expected-cost integral."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowception_jax import datasets
from flowception_jax.core import flowception
from flowception_jax.core import inference
from flowception_jax.core import model as model_lib
from flowception_jax.research import bench
from flowception_jax.research import recipe_cost
from flowception_jax.storage import files
from tests import compilations
from tests import config_files
from tests import tiny_params

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEYS = (
    'peak_flops', 'train.flowception_s_per_example', 'train.full_sequence_s_per_example',
    'train.cost_ratio_measured', 'train.cost_ratio_analytic', 'train.model_flops_per_example',
    'train.mfu', 'train.profile_matmul_share', 'sample.flowception_s', 'sample.full_sequence_s',
    'sample.flowception_nfe', 'sample.full_sequence_nfe', 'sample.compile_s', 'train.compile_s',
    'sample.flowception_staged_s', 'sample.full_sequence_matched_nfe_s',
    'sample.staged_speed_ratio', 'sample.matched_nfe_speed_ratio',
    'sample.latent.staged_cost_ratio', 'sample.latent.plain_cost_ratio',
    'train.matmul_ceiling_flops', 'train.mfu_own_ceiling', 'train.step_matmul_flops',
    'data.examples_per_s', 'data.train_examples_per_s')
SAMPLERS = ('flowception', 'flowception_staged', 'full_sequence', 'full_sequence_matched_nfe')


@pytest.mark.e2e
def test_benchmark_writes_every_figure(tmp_path):
  config = config_files.load('bench', 'tiny')
  results = bench.run(config)
  path = tmp_path / 'bench.json'
  files.write_json(str(path), results)  # As the command writes them.
  written = json.loads(path.read_text())
  for key in KEYS:
    assert math.isfinite(written[key]) and written[key] > 0, key
  assert written['train.cost_ratio_measured'] == pytest.approx(
      written['train.flowception_s_per_example'] / written['train.full_sequence_s_per_example'])
  # The step's own matrix products (its jaxpr) against the analytic 3x forward count.
  assert 0.8 < written['train.step_matmul_flops'] / written['train.step_model_flops'] < 1.2
  steps = config.sampler.num_steps
  assert written['sample.full_sequence_nfe'] == steps
  assert steps <= written['sample.flowception_nfe'] <= 2 * steps + 2
  assert written['sample.full_sequence_matched_nfe_nfe'] == written['sample.matched_nfe_steps']
  assert written['sample.matched_nfe_steps'] == round(written['sample.flowception_nfe'])
  for name in SAMPLERS:  # XLA counts the elementwise work too.
    analytic, xla = (written[f'sample.{name}_{k}'] for k in ('flops_per_frame',
                                                            'xla_flops_per_frame'))
    assert 0 < analytic <= xla * 1.01, name
  # The same videos, staged or not: the same frames; never more evaluations of N_max slots.
  assert (written['sample.flowception_staged_mean_length']
          == written['sample.flowception_mean_length'])
  assert written['sample.flowception_staged_flops_per_frame'] <= written[
      'sample.flowception_flops_per_frame']
  for kappa in flowception.KAPPAS:
    for distribution in recipe_cost.TAU_DISTRIBUTIONS:
      for figure in ('analytic_visible_fraction', 'analytic_attention_ratio',
                     'pipeline_visible_fraction', 'pipeline_attention_ratio'):
        assert 0.0 < written[f'recipe.{kappa}/{distribution}.{figure}'] <= 1.0
  assert os.listdir(tmp_path) == ['bench.json']  # No temporary file left behind.
  assert 'train.mfu' in bench.format_table(written)


def test_a_failed_write_of_the_figures_leaves_neither_them_nor_a_temporary_file(tmp_path,
                                                                               monkeypatch):
  path = str(tmp_path / 'bench.json')
  # A figure left as a NumPy scalar: refused before anything is written.
  with pytest.raises(TypeError, match='float32 is not JSON serializable'):
    files.write_json(path, {'peak_flops': 1e12, 'train.mfu': np.float32(0.4)})
  assert os.listdir(tmp_path) == []

  def disk_full(source, target):
    assert os.path.dirname(source) == os.path.dirname(target) == str(tmp_path)
    assert json.loads(open(source).read())['train.mfu'] == 0.4  # Written, not yet in place.
    raise OSError(28, 'No space left on device')

  # A write that fails once its bytes are out: the temporary file goes too.
  monkeypatch.setattr(files.os, 'replace', disk_full)
  with pytest.raises(OSError, match='No space left on device'):
    files.write_json(path, {'peak_flops': 1e12, 'train.mfu': 0.4})
  assert os.listdir(tmp_path) == []


def test_flop_count_matches_a_hand_count():
  # tiny DiT: width 32, 2 blocks, 2 heads, MLP 128; 8x8x3 frames in 4x4 patches, 2 frames.
  model = model_lib.DiT(patch_size=4, channels=3, hidden_size=32, depth=2, num_heads=2)
  frames, patches = 2, 4
  tokens = frames * (patches + 1)  # 10: each frame's patches and its rate token.
  multiply_adds = (
      frames * patches * 96 * 32  # Patch embedding: 4 * 4 * (3 + 3 context) inputs.
      + frames * (256 * 32 + 32 * 32)  # Time MLP from 256 sinusoidal features.
      + 2 * (frames * 32 * 192  # Per block: adaLN to 6 * 32.
             + tokens * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)  # QKV, out, MLP in and out.
             + 2 * tokens * tokens * 32)  # Scores and weighted values (2 heads of 16).
      + frames * (32 * 64 + patches * 32 * 48 + 32 * 32 + 32 * 1))  # Final adaLN, velocity, rate.
  assert bench.forward_flops(model, frames, (8, 8, 3)) == 2 * multiply_adds
  assert bench.train_flops(model, frames, (8, 8, 3)) == 6 * multiply_adds

  inputs = model_lib.init_inputs((8, 8, 3), frames, 0)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs)))
  matmuls = bench.step_matmuls(jax.make_jaxpr(model.apply)(params, *inputs))
  assert sum(m.flops for m in matmuls) == 2 * multiply_adds


def test_sampling_cost_model_bounds_and_limits():
  """One stage and one video per batch: staged and plain cost the same; finer stages cost less;
  full-sequence runs its steps over every slot; large batches run as long as their last video."""
  model = model_lib.DiT(patch_size=4, channels=3, hidden_size=32, depth=2, num_heads=2)
  lengths = np.random.default_rng(1).integers(3, 13, size=64)
  common = dict(num_start_frames=2, num_steps=20, kappa='linear')
  one = bench.sampling_cost_model(model, (8, 8, 3), lengths, stages=(12,), batch_size=1, **common)
  assert one['staged_flops_per_frame'] == pytest.approx(one['plain_flops_per_frame'])
  fine = bench.sampling_cost_model(model, (8, 8, 3), lengths, stages=tuple(range(2, 13)),
                                   batch_size=64, **common)
  assert fine['staged_flops_per_frame'] < 0.7 * fine['plain_flops_per_frame']
  full = 64 * 20 * bench.forward_flops(model, 12, (8, 8, 3)) / lengths.sum()
  assert fine['full_sequence_flops_per_frame'] == pytest.approx(full)
  assert 20 < fine['staged_iterations'] < fine['plain_iterations'] <= 40


def test_matmul_ceiling_runs_the_products_it_was_given():
  a = bench.Matmul(jax.ShapeDtypeStruct((8, 16, 32), jnp.float32),
                   jax.ShapeDtypeStruct((8, 32, 4), jnp.float32), (((2,), (1,)), ((0,), (0,))),
                   None)
  assert a.flops == 2 * 8 * 16 * 32 * 4
  probe = bench.matmul_ceiling([a, a])
  rates = probe(3)
  assert len(rates) == 3 and all(r > 0 for r in rates)


@pytest.mark.parametrize('kappa', sorted(flowception.KAPPAS))
def test_expected_visible_count_agrees_with_drawn_examples(kappa):
  k = flowception.get_kappa(kappa)
  rng = np.random.default_rng(0)
  for distribution in recipe_cost.TAU_DISTRIBUTIONS:
    counts = np.array([flowception.sample_extended_time(
        rng, 10, kappa=k, num_start_frames=2, tau_distribution=distribution).visible.sum()
                       for _ in range(4000)])
    mean, second = recipe_cost.expected_visible(k, distribution, 10, 2)
    # The integral leaves out the redraws of global times with no frame in flow: a small bias.
    assert mean == pytest.approx(counts.mean(), rel=0.03)
    assert second == pytest.approx((counts**2).mean(), rel=0.05)
  assert recipe_cost.expected_visible(k, 'uniform', 2, 2) == (2.0, 4.0)


def test_sampler_comparison_times_the_same_videos():
  config = config_files.load('bench', 'tiny')
  config.data.max_frames = 6
  config.sampler.stages = (2, 4, 6)
  config.sampler.min_running = 1.0
  info = datasets.SourceInfo(frame_shape=(8, 8, 3), max_frames=6, num_classes=0)
  model = model_lib.DiT(patch_size=4, channels=3, hidden_size=16, depth=1, num_heads=2)
  # Random heads too: lengths vary.
  params = tiny_params.perturbed_init(model, *model_lib.init_inputs((8, 8, 3), 2, 0),
                                      scale=0.2)['params']
  trained = inference.TrainedModel(config=config, info=info, model=model, params=params, step=0)
  with compilations.counted() as counts:
    results = bench.compare_samplers(trained, config, num_videos=7, batch_size=3, repeats=1)
  assert counts['sample'] == 1  # The runs reuse the plain sampler's timed compilation.
  assert results['staged.same_lengths'] and results['staged.max_frame_difference'] < 1e-4
  assert results['staged.stages'] == [2, 4, 6]
  for key in ('staged.plain_s', 'staged.staged_s', 'staged.speed_ratio', 'staged.slot_ratio',
              'staged.plain_compile_s', 'staged.staged_compile_s', 'staged.row_use'):
    assert math.isfinite(results[key]) and results[key] > 0, key
  assert len(results['staged.speed_ratios']) == 1
  assert 'staged.speed_ratio' in bench.format_table(results)


@pytest.mark.e2e  # A process of the benchmark command (stopping before it runs).
def test_command_refuses_an_output_in_a_missing_folder(tmp_path):
  output = tmp_path / 'missing' / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.research.bench', '--config=configs/bench.py:tiny',
       f'--output={output}'], cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert 'does not exist; create it first' in result.stderr
  assert not output.parent.exists()
