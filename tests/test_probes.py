"""Model diagnostics against models whose answers are known: blind attention, frozen attention."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import shapes as shapes_config
from flowception_jax.core import model as model_lib
from flowception_jax.research import probes
from flowception_jax.training import train

F = 3
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clips():
  return probes.data_clips(shapes_config.get_config('tiny').data, num_clips=2, frames=F)


def _net():
  return model_lib.DiT(patch_size=4, channels=3, hidden_size=32, depth=2, num_heads=2)


def _params(net, scale=0.1, edit=None):
  """Perturbed initial parameters (so gates and heads carry signal); `edit(path, x)` rewrites
  leaves."""
  params = nn.unbox(net.init(jax.random.key(0), *model_lib.init_inputs((16, 16, 3), F, 0)))
  params = params['params']
  leaves, tree = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  new = []
  for (path, x), k in zip(leaves, keys):
    x = x + scale * jax.random.normal(k, x.shape)
    new.append(edit(jax.tree_util.keystr(path), x) if edit else x)
  return jax.tree.unflatten(jax.tree.structure(params), new)


def test_uniform_attention_reads_as_uniform():
  """Zero queries and keys: every weight is 1/S, entropy log S, own frame 1/F."""
  zero_qk = lambda path, x: x * 0 if 'qkv' in path else x
  net = _net()
  stats = probes.attention_stats(net, _params(net, edit=zero_qk), _clips(), t=0.5)
  assert len(stats) == net.depth
  for block in stats:
    np.testing.assert_allclose(block['entropy'], block['uniform_entropy'], rtol=1e-5)
    np.testing.assert_allclose(block['own_frame'], block['uniform_own_frame'], rtol=1e-5)
    np.testing.assert_allclose(block['neighbours'], block['uniform_neighbours'], rtol=1e-5)
    np.testing.assert_allclose(block['max_weight'], 1 / (F * 17), rtol=1e-5)
  # A model with random queries and keys attends unevenly.
  assert stats[0]['entropy'] - probes.attention_stats(net, _params(net, scale=1.0), _clips(),
                                                      t=0.5)[0]['entropy'] > 0.05


def test_without_attention_patches_are_denoised_alone_and_blind_to_position():
  """Attention gates at zero: no patch influences another, and scrambling commutes with the model
  except through the rotary embeddings, which only attention reads."""
  net = _net()
  no_attention = lambda path, x: x.at[..., 2 * 32:3 * 32].set(0) if "'adaln'" in path else x
  params = _params(net, edit=no_attention)
  influence = probes.patch_influence(net, params, _clips(), t=0.5)
  assert influence['own_patch'] > 1e-2
  assert influence['other_patches'] < 1e-6 and influence['other_frames'] < 1e-6
  position = probes.position_sensitivity(net, params, _clips(), t=0.5)
  assert position['output_change'] < 1e-5
  # With attention, both move.
  full = _params(net)
  assert probes.patch_influence(net, full, _clips(), t=0.5)['other_patches'] > 1e-4
  assert probes.position_sensitivity(net, full, _clips(), t=0.5)['output_change'] > 1e-3


@pytest.mark.e2e
def test_command_probes_a_trained_workdir(tmp_path):
  config = shapes_config.get_config('tiny')
  config.total_steps = 2
  config.checkpoint_every = 2
  train.train_and_evaluate(config, str(tmp_path))
  out = subprocess.run([
      sys.executable, '-m', 'flowception_jax.research.probes', f'--workdir={tmp_path}',
      '--num_clips=2', '--frames=3', '--times=0.5'
  ],
                       cwd=_ROOT,
                       capture_output=True,
                       text=True,
                       check=True)
  report = json.loads(out.stdout)
  assert report['step'] == 2 and set(report['t=0.5']) == {
      'patch_influence', 'position_sensitivity', 'attention'}
  with pytest.raises(ValueError, match='no clips of 99 frames \\(at most 12\\); lower --frames'):
    probes.data_clips(config.data, num_clips=2, frames=99)
