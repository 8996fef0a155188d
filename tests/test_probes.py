"""Model diagnostics against models whose answers are known: blind attention, frozen attention."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shapes as shapes_config
from flowception_jax.core import model as model_lib
from flowception_jax.research import probes
from flowception_jax.training import train
from tests import tiny_params

F = 3
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clips():
  return probes.data_clips(shapes_config.get_config('tiny').data, num_clips=2, frames=F)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled_apply(net, capture_intermediates, mutable, variables, *args):
  """`net.apply`, compiled once per module, intermediates setting and argument shapes."""
  return net.apply(variables, *args, capture_intermediates=capture_intermediates, mutable=mutable)


class _CompiledDiT:
  """A DiT whose `apply` runs as one compiled program (the probes call it eagerly, which compiles
  op by op); its other attributes are the DiT's."""

  def __init__(self, net: model_lib.DiT):
    self.net = net

  def __getattr__(self, name):
    return getattr(self.net, name)

  def apply(self, variables, *args, capture_intermediates=False, mutable=False):
    mutable = tuple(mutable) if isinstance(mutable, list) else mutable
    return _compiled_apply(self.net, capture_intermediates, mutable, variables, *args)


def _net():
  return _CompiledDiT(model_lib.DiT(patch_size=4, channels=3, hidden_size=32, depth=2,
                                    num_heads=2))


def _params(net, scale=0.1, edit=None):
  """Perturbed initial parameters (so gates and heads carry signal); `edit(path, x)` rewrites
  leaves."""
  params = tiny_params.perturbed_init(net.net, *model_lib.init_inputs((16, 16, 3), F, 0),
                                      scale=scale)['params']
  if edit is None:
    return params
  return jax.tree.map_with_path(lambda path, x: edit(jax.tree_util.keystr(path), x), params)


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
