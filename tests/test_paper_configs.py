"""The paper's configs in latent space (`configs/taichi.py`, `realestate10k.py`, `kinetics600.py`):
what they plan before any data exists, their memory, the data they refuse, and the trainer's
refusal of a run that cannot fit a device."""

import os

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from flowception_jax.core import model as model_lib
from flowception_jax import datasets
from flowception_jax.datasets import video_folder
from flowception_jax.research import memory_estimate
from flowception_jax.training import config as config_lib
from flowception_jax.training import memory
from flowception_jax.training import train
from tests import config_files

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {'taichi': 0, 'realestate10k': 0, 'kinetics600': 600}  # Config name: classes.
LATENT = (8, 8, 128)  # A 256 px frame of LTX-Video.


def parse(spec: str, *overrides: str):
  """The config of `--config=spec` with `overrides`, parsed as the commands parse them."""
  argv = ['prog', f'--config={os.path.join(_ROOT, spec)}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('name', PAPER)
def test_latent_configs_plan_their_frames_without_data_and_take_overrides(name):
  config = parse(f'configs/{name}.py', '--config.batch_size=512',
                 '--config.data.latent_shape=(16,16,128)')
  assert config.batch_size == 512 and tuple(config.data.latent_shape) == (16, 16, 128)
  config = parse(f'configs/{name}.py')
  assert config.model.size == 'paper' and config.model.patch_size == 1
  assert config.data.min_frames == 2 and config.data.buckets[-1] == config.data.max_frames == 19
  info, origin = memory_estimate.planned_info(config.data)
  assert origin.startswith('the config') and 'data_dir' in origin
  assert info.frame_shape == LATENT and info.max_frames == 19 and not info.pixels
  assert info.num_classes == PAPER[name]
  with pytest.raises(AttributeError):  # A typo fails (lock_config).
    parse(f'configs/{name}.py', '--config.data.latent_shap=(8,8,128)')


def test_clip_lengths_follow_the_autoencoders_frame_arithmetic():
  """16 to 145 frames are 2 to 19 latent frames: a video keeps its longest 1 + 8k prefix."""
  config = config_lib.load_file('configs/taichi.py')
  latent_frames = lambda frames: 1 + (frames - 1) // 8
  assert (config.data.min_frames, config.data.max_frames) == (latent_frames(16),
                                                              latent_frames(145))


@pytest.mark.parametrize('variant, size, patch', [('pixels', 256, 16), ('pixels128', 128, 8),
                                                  ('pixels64', 64, 4)])
def test_pixel_variants_keep_the_pixel_setting(variant, size, patch):
  config = config_lib.load_file(f'configs/taichi.py:{variant}')
  assert config.data.latent_shape == () and config.data.image_size == size
  assert config.model.patch_size == patch and config.data.max_frames == 145
  info, _ = memory_estimate.planned_info(config.data)
  assert info.frame_shape == (size, size, 3) and info.pixels


@pytest.mark.parametrize('name', PAPER)
def test_each_latent_config_fits_a_v5e_pod_slice_by_the_estimate(name):
  """Without data or devices; the 'paper' DiT (1536 wide, 38 blocks, 24 heads) on 128-channel
  latents, patch 1, is 1.63B parameters, and its float32 state splits over the 256 chips."""
  config = config_lib.load_file(f'configs/{name}.py')
  result = memory_estimate.estimate(config, chips=256)
  assert model_lib.MODEL_SIZES['paper'] == (1536, 38, 24)
  assert 1.62e9 < result.num_params < 1.63e9
  # Float32, split over the chips but for small arrays (biases, norms) that stay whole.
  assert 4 * result.num_params / 256 <= result.params < 4 * result.num_params / 200
  assert result.frames == 19 and result.examples_per_chip == 1
  assert result.total < 16 * 2**30


def _latent_folder(directory, shape=LATENT, classes=(), kind='latents'):
  rng = np.random.default_rng(0)
  with video_folder.FolderWriter(str(directory), kind=kind, classes=classes) as writer:
    for i in range(2):
      video = (rng.integers(0, 255, (4,) + shape, np.uint8) if kind == 'pixels'
               else rng.normal(size=(4,) + shape).astype(np.float32))
      writer.add(f'video_{i}', video, label=i % max(len(classes), 1))
  return str(directory)


def test_data_of_another_form_is_refused_naming_the_fix(tmp_path):
  config = config_lib.load_file('configs/kinetics600.py')
  classes = [f'class_{i}' for i in range(600)]
  config.data.data_dir = _latent_folder(tmp_path / 'ok', classes=classes)
  assert datasets.make_source(config.data)[1].frame_shape == LATENT
  config.data.data_dir = _latent_folder(tmp_path / 'pixels', (32, 32, 3), classes, 'pixels')
  with pytest.raises(ValueError, match=r'latents of 8x8x128 .* holds pixels.*--encoder=ltx'):
    datasets.make_source(config.data)
  config.data.data_dir = _latent_folder(tmp_path / 'small', (4, 4, 128), classes)
  with pytest.raises(ValueError, match='holds latents of 4x4x128'):
    datasets.make_source(config.data)
  config.data.data_dir = _latent_folder(tmp_path / 'few', classes=classes[:400])
  with pytest.raises(ValueError, match='expects 600 classes .* has 400.*num_classes=400'):
    datasets.make_source(config.data)
  config.data.num_classes = 0
  assert datasets.make_source(config.data)[1].num_classes == 400


def test_the_refusal_names_the_figure_and_the_fixes():
  result = memory_estimate.estimate(config_lib.load_file('configs/taichi.py:tiny'), chips=2)
  memory.check_fits(result, result.total)
  with pytest.raises(MemoryError) as refusal:
    memory.check_fits(result, result.total - 1)
  message = str(refusal.value)
  assert f'{result.total / 2**30:.2f} GiB per device' in message
  for fix in ('--config.mesh.fsdp=-1', '--config.model.remat=full',
              '--config.model.attention=blockwise', '--config.batch_size',
              '--config.grad_accum_steps', '--config.check_memory=False'):
    assert fix in message


def test_the_trainer_refuses_before_compiling_on_a_small_device(tmp_path, monkeypatch):
  monkeypatch.setattr(memory, 'device_limit', lambda: 2**20)
  monkeypatch.setattr(train, 'init_sharded', lambda *args: pytest.fail('compiled'))
  config = config_files.load('shapes', 'tiny')
  with pytest.raises(MemoryError, match='GiB per device .* holds 0.00 GiB'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config.check_memory = False
  with pytest.raises(pytest.fail.Exception, match='compiled'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.e2e
def test_kinetics600_tiny_trains_on_latents_of_the_paper_shape(tmp_path):
  config = config_lib.load_file('configs/kinetics600.py:tiny')
  config.data.data_dir = _latent_folder(tmp_path / 'k600',
                                        classes=[f'class_{i}' for i in range(600)])
  config.data.buckets = (config.data.max_frames,)  # One bucket: one compilation.
  config.total_steps = config.checkpoint_every = 2
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
