"""Workdirs and outputs in a bucket: gs:// paths against the fake object store of `fake_gcs.py`.

Only the workdir and the outputs are gs:// paths; the data stays local. A gs:// path mistaken for
a local one would create a folder named `gs:` in the current directory, which each test checks.
"""

import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import coloring
from flowception_jax import sample
from flowception_jax.evaluation import evaluators
from flowception_jax.evaluation import fvd
from flowception_jax.storage import files
from flowception_jax.training import checkpoint
from flowception_jax.training import config as config_lib
from flowception_jax.training import train
from tests import config_files

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stored(fake_gcs, prefix: str) -> list[str]:
  """The objects under `prefix` in the fake store, folder markers left out."""
  return sorted(p for p in fake_gcs.objects if p.startswith(prefix) and not p.endswith('/'))


def _toy_state(step: int) -> dict:
  """Random floats: incompressible, so Orbax stores them apart from its metadata."""
  w = np.random.default_rng(step).normal(size=(64, 256))
  return {'params': {'w': jnp.asarray(w, jnp.float32)}, 'step': jnp.int32(step)}


# Orbax leaves its failed reads' coroutines to the garbage collector, which reports them.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_checkpoints_in_a_bucket_restore_and_a_damaged_one_is_moved_aside(fake_gcs, tmp_path,
                                                                          monkeypatch):
  # Orbax asks google-cloud-storage about the bucket: without that package any gs:// workdir fails.
  monkeypatch.chdir(tmp_path)
  workdir, config = 'gs://bucket/run', config_lib.base_config()
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  manager = checkpoint.make_manager(workdir)
  for step in (1, 2):
    next(iterator)
    checkpoint.save(manager, step, _toy_state(step), iterator, config)
  checkpoint.wait(manager)
  manager.close()
  arrays = _stored(fake_gcs, 'gs://bucket/run/checkpoints/2/state/ocdbt.process_0/d/')
  assert arrays
  for path in arrays:  # The newest checkpoint's array data, cut short in the bucket.
    files.write_bytes(path, fake_gcs.objects[path][:10])

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _toy_state(0))
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  manager = checkpoint.make_manager(workdir)
  step, state = checkpoint.restore_latest(manager, abstract, iterator, config, workdir)
  assert step == 1 and manager.all_steps() == [1]
  manager.close()
  np.testing.assert_array_equal(state['params']['w'], _toy_state(1)['params']['w'])
  assert next(iterator) == 1  # The data position saved with step 1.
  moved = _stored(fake_gcs, 'gs://bucket/run/corrupt_checkpoints/2/')
  assert 'gs://bucket/run/corrupt_checkpoints/2/state/ocdbt.process_0/' + arrays[0].split(
      '/ocdbt.process_0/')[1] in moved
  assert not _stored(fake_gcs, 'gs://bucket/run/checkpoints/2/')
  assert os.listdir(tmp_path) == []


@pytest.mark.e2e
def test_a_latent_model_trains_samples_and_is_evaluated_in_a_bucket(fake_gcs, tmp_path,
                                                                    monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_files.tiny_latent_run(str(tmp_path / 'latents'), seed=0)
  config.total_steps = config.checkpoint_every = 2
  config.evals.samples.num_videos = 2
  workdir = 'gs://bucket/run'

  # Training: checkpoints, the metrics' event file and the latent samples land in the bucket.
  train.train_and_evaluate(config, workdir, make_evaluators=evaluators.from_config)
  assert any(p.startswith('gs://bucket/run/checkpoints/2/state/') for p in fake_gcs.objects)
  assert _stored(fake_gcs, 'gs://bucket/run/events.out.tfevents.')
  during = files.read_npz('gs://bucket/run/samples_000002.npz')
  assert during['latents'].shape == (2, 6, 4, 4, 3) and during['lengths'].shape == (2,)

  # Sampling, as `flowception_jax.sample --workdir=gs://... --output=gs://...` does it.
  samples, sample_config, info = sample.sample_outputs(workdir, num_videos=3, seed=0)
  summary = sample.write_outputs('gs://bucket/out/s.npz', samples, sample_config, info)
  assert _stored(fake_gcs, 'gs://bucket/out/') == ['gs://bucket/out/s.npz']  # Latents: no GIF.
  written = files.read_npz('gs://bucket/out/s.npz')
  assert sorted(written) == ['latents', 'lengths'] and 'latents' in summary
  assert written['latents'].shape == (3, 6, 4, 4, 3) and written['latents'].dtype == np.float32
  np.testing.assert_array_equal(written['lengths'], samples.lengths)

  # The evaluation command, in its own process (run here, in the temporary folder), which finds
  # the fake store through the environment the fixture set.
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.evaluate', f'--workdir={workdir}',
       '--num_videos=2', '--batch_size=2', '--output=gs://bucket/out/eval.json'],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=_ROOT), capture_output=True, text=True,
      timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  evaluation = json.loads(fake_gcs.objects['gs://bucket/out/eval.json'])
  assert evaluation['workdir'] == workdir and evaluation['step'] == 2
  assert evaluation['num_videos'] == evaluation['num_data'] == 2
  assert 1 <= evaluation['min_length'] <= evaluation['max_length'] <= 6
  assert 0.0 <= evaluation['data_length_tv'] <= 1.0 and 'fvd' not in evaluation

  # The data's I3D statistics are cached in a gs:// workdir as in a local one: the second
  # evaluation reads them back instead of computing them.
  data_config, i3d = coloring.get_config('tiny').data, fvd.load_i3d()
  first = evaluators.data_reference(data_config, 2, i3d=i3d, cache_dir=workdir, batch_size=2)
  (cache,) = _stored(fake_gcs, 'gs://bucket/run/fvd_reference_')

  def not_again(*args, **kwargs):
    raise AssertionError('the cached I3D statistics were computed again')

  monkeypatch.setattr(fvd, 'i3d_features', not_again)
  again = evaluators.data_reference(data_config, 2, i3d=i3d, cache_dir=workdir, batch_size=2)
  np.testing.assert_array_equal(again.fvd_stats.mean, first.fvd_stats.mean)
  np.testing.assert_array_equal(again.fvd_stats.cov, first.fvd_stats.cov)
  np.testing.assert_array_equal(again.lengths, first.lengths)
  assert _stored(fake_gcs, 'gs://bucket/run/fvd_reference_') == [cache]
  assert os.listdir(tmp_path) == ['latents']  # Nothing in a local 'gs:' folder.
