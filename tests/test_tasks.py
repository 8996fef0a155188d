"""The tasks at sampling time: context files, class names, context frames kept at their slots, and
the `sample` command with a task."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import camera as camera_config
from configs import shapes as shapes_config
from flowception_jax.core import inference
from flowception_jax.core import tasks
from flowception_jax import datasets
from flowception_jax.research import task_eval
from flowception_jax.training import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME = (16, 16, 3)
CAPACITY = 12


def _npz(path, frames):
  np.savez(path, frames=frames)
  return str(path)


def test_load_context_reads_images_and_npz(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'first.png')
  frames = tasks.load_context(str(tmp_path / 'first.png'), 'i2v', FRAME, CAPACITY)
  assert frames.shape == (1,) + FRAME and frames.dtype == np.float32
  np.testing.assert_allclose(frames[0] * 255.0, pixels, atol=1e-4)
  keys = np.random.default_rng(1).uniform(size=(3,) + FRAME)
  frames = tasks.load_context(_npz(tmp_path / 'keys.npz', keys), 'interpolate', FRAME, CAPACITY)
  np.testing.assert_array_equal(frames, keys.astype(np.float32))


@pytest.mark.parametrize('name, content, task, message', [
    ('big.png', 'image32', 'i2v', 'is 32x32 pixels: expected an image of 16x16'),
    ('video.mp4', None, 'extend', r'expected an image of 16x16 pixels, or an \.npz'),
    ('ints.npz', 'uint8', 'extend', r'float32 \[K, 16, 16, 3\] in \[0, 1\]'),
    ('range.npz', 'range', 'extend', r'range over \[255.0, 255.0\]'),
    ('other.npz', 'no_frames', 'extend', 'no `frames`'),
    ('size.npz', 'size', 'extend', r'do not fit this model.*\[K, 16, 16, 3\]'),
    ('two.npz', 'two', 'i2v', 'i2v takes one image'),
    ('one.npz', 'one', 'interpolate', 'at least 2 context frames'),
    ('full.npz', 'full', 'extend', 'give at most 11'),
    ('missing.npz', None, 'extend', 'no context file'),
])
def test_bad_context_files_say_what_is_expected(tmp_path, name, content, task, message):
  path = tmp_path / name
  frames = {'uint8': np.zeros((2,) + FRAME, np.uint8), 'range': np.full((2,) + FRAME, 255.0),
            'size': np.zeros((2, 8, 8, 3), np.float32), 'two': np.zeros((2,) + FRAME, np.float32),
            'one': np.zeros((1,) + FRAME, np.float32),
            'full': np.zeros((CAPACITY,) + FRAME, np.float32)}
  if content == 'image32':
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
  elif content == 'no_frames':
    np.savez(path, video=np.zeros((2,) + FRAME, np.float32))
  elif content in frames:
    _npz(path, frames[content])
  elif name.endswith('.mp4'):
    path.write_bytes(b'not a video')
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    tasks.load_context(str(path), task, FRAME, CAPACITY)


def test_written_contexts_load_as_task_inputs(tmp_path):
  data_config = shapes_config.get_config().data
  task_eval.write_contexts(str(tmp_path), data_config, prefix=3)
  first = tasks.load_context(str(tmp_path / 'first.png'), 'i2v', FRAME, CAPACITY)
  prefix = tasks.load_context(str(tmp_path / 'prefix.npz'), 'extend', FRAME, CAPACITY)
  keys = tasks.load_context(str(tmp_path / 'keys.npz'), 'interpolate', FRAME, CAPACITY)
  assert prefix.shape == keys.shape == (3,) + FRAME
  np.testing.assert_allclose(first[0], prefix[0], atol=0.5 / 255)
  np.testing.assert_array_equal(keys[0], prefix[0])  # Both start at the clip's first frame.
  with pytest.raises(ValueError, match='held-out clips exist for shapes and camera only'):
    task_eval.held_out_clips(ml_collections.ConfigDict({'name': 'coloring'}), 2, 3)
  with pytest.raises(ValueError, match='exact on shapes only'):
    task_eval.write_contexts(str(tmp_path), camera_config.get_config().data, prefix=3)


def test_task_and_context_must_agree():
  with pytest.raises(ValueError, match='needs context frames: --context=FILE'):
    tasks.check_context('extend', None, FRAME, CAPACITY)
  with pytest.raises(ValueError, match='generate takes no context'):
    tasks.check_context('generate', np.zeros((1,) + FRAME), FRAME, CAPACITY)
  with pytest.raises(ValueError, match='unknown task'):
    tasks.check_context('upscale', None, FRAME, CAPACITY)


def test_class_label_by_id_or_name():
  names = ('disc', 'square', 'triangle')
  assert tasks.class_label('2', 3, names) == 2
  assert tasks.class_label(1, 3) == 1
  assert tasks.class_label('Square', 3, names) == 1
  with pytest.raises(ValueError, match='did you mean square'):
    tasks.class_label('sqare', 3, names)
  with pytest.raises(ValueError, match='out of range.*0..2'):
    tasks.class_label('3', 3, names)
  with pytest.raises(ValueError, match='no class names; give a class id in 0..2'):
    tasks.class_label('disc', 3)
  with pytest.raises(ValueError, match='unconditional.*drop --class'):
    tasks.class_label('0', 0)


def test_shapes_kind_labels_name_the_primary_shape():
  """A fully visible shape fills the box of its longest row and column by its kind: square 1,
  disc pi/4, triangle 1/2."""
  source, info = datasets.make_source({'name': 'shapes', 'image_size': 32, 'max_shapes': 1,
                                       'kind_labels': True})
  assert info.num_classes == 3 and info.class_names == ('disc', 'square', 'triangle')
  fill = {0: np.pi / 4, 1: 1.0, 2: 0.5}
  labels = []
  for index in range(30):
    record = source[index]
    video, label = record['video'], int(record['label'])
    background = np.median(video.reshape(-1, 3), axis=0)
    coverage = np.abs(video - background).max(axis=-1)  # [T, H, W], shape pixels > 0.
    frame = coverage[len(video) // 2]  # Mid-clip the shape crosses the centre region.
    rows, cols = np.nonzero(frame > 0.01)
    if rows.min() == 0 or cols.min() == 0 or rows.max() == 31 or cols.max() == 31:
      continue
    alpha = frame / frame.max()  # Coverage: some pixel is fully covered.
    box = alpha.sum(axis=0).max() * alpha.sum(axis=1).max()  # Widest column and row.
    ratio = alpha.sum() / box
    assert min(fill, key=lambda k: abs(fill[k] - ratio)) == label, (index, ratio, label)
    labels.append(label)
  assert set(labels) == {0, 1, 2}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny class-conditional shapes model (classes: the shape kinds) trained for two steps."""
  workdir = str(tmp_path_factory.mktemp('tasks') / 'run')
  config = shapes_config.get_config('tiny')
  config.data.kind_labels = True
  config.total_steps = 2
  config.checkpoint_every = 2
  config.data.buckets = (CAPACITY,)
  config.evals.samples.num_videos = 2
  train.train_and_evaluate(config, workdir)
  return workdir


class _TraceCounted:
  """Stands for a model in the samplers: its `apply` fails the test when traced more than `n`
  times in all (`chex.assert_max_traces`)."""

  def __init__(self, model, n: int):
    def apply(*args, **kwargs):  # A plain function: chex refuses Flax's wrapped `apply` itself.
      return model.apply(*args, **kwargs)

    self.apply = chex.assert_max_traces(apply, n=n)


@pytest.mark.e2e
def test_tasks_keep_their_context_frames_at_their_slots(workdir):
  loaded = inference.load(workdir)
  chex.clear_trace_counter()
  # Three samplers below (two batch sizes, one in batches), each traced once: every task, context,
  # seed and batch reuses its compilation.
  trained = dataclasses.replace(loaded, model=_TraceCounted(loaded.model, n=3))
  b, capacity = 8, trained.info.max_frames
  sampler = tasks.TaskSampler(trained, b)
  rng = np.random.default_rng(3)
  slots, lengths = {}, {}
  for seed, (task, k) in enumerate([('i2v', 1), ('extend', 3), ('interpolate', 3)]):
    context = rng.uniform(size=(b, k) + FRAME).astype(np.float32)  # Per-video context frames.
    out = sampler(task, context, seed=seed)
    slots[task], lengths[task] = out.context_slots, out.lengths
    assert out.context_slots.shape == (b, k) and out.context_slots.dtype == np.int32
    assert np.all((out.lengths >= k) & (out.lengths <= capacity))
    for row in range(b):
      np.testing.assert_allclose(out.videos[row, out.context_slots[row]], context[row], atol=1e-5)
  assert sampler('generate', seed=4).context_slots.shape == (b, 0)
  np.testing.assert_array_equal(slots['i2v'], 0)
  np.testing.assert_array_equal(slots['extend'], np.broadcast_to(np.arange(3), (b, 3)))
  keys = slots['interpolate']
  assert np.all(keys[:, 0] == 0) and np.all(np.diff(keys, axis=1) > 0)
  # Nothing is inserted after the passive key frame, so it ends every video.
  np.testing.assert_array_equal(keys[:, -1], lengths['interpolate'] - 1)
  between = np.diff(keys, axis=1) - 1
  assert len(np.unique(between[:, 0])) > 1  # The model chose how many frames go between.

  # In batches: every video keeps its own context, batch i is what a sampler of one batch makes.
  batched = tasks.TaskSampler(trained, b, batch_size=3)
  context = rng.uniform(size=(b, 3) + FRAME).astype(np.float32)
  out = batched('extend', context, seed=0)
  assert out.videos.shape[0] == out.lengths.shape[0] == b
  for row in range(b):
    np.testing.assert_allclose(out.videos[row, out.context_slots[row]], context[row], atol=1e-5)
  one_batch = tasks.TaskSampler(trained, 3)('generate', seed=5)
  np.testing.assert_array_equal(batched('generate', seed=5).videos[:3], one_batch.videos)

  # The task scores run on the same sampler; the data's own interpolation is exact.
  scores = task_eval.evaluate(sampler, seed=0, prefix=3)
  assert set(scores) == {'i2v', 'i2v_without_context', 'extend', 'extend_without_context',
                         'interpolate', 'interpolate_data'}
  assert scores['interpolate']['keys_in_place'] == 1.0
  assert scores['interpolate_data']['motion_residual'] < 0.2
  assert scores['interpolate_data']['gap_error'] == 0.0
  assert scores['i2v']['position_error_count'] + scores['i2v']['length_error_count'] > 0


@pytest.mark.e2e
def test_sample_command_image_to_video_of_a_named_class(workdir, tmp_path):
  pixels = np.random.default_rng(4).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'first.png')
  output = str(tmp_path / 'i2v.npz')
  result = subprocess.run(
      [sys.executable, '-m', 'flowception_jax.sample', f'--workdir={workdir}', '--num_videos=3',
       f'--output={output}', '--task=i2v', f'--context={tmp_path / "first.png"}',
       '--class=square', '--guidance_scale=2'],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(output) as saved:
    assert set(saved.files) == {'videos', 'lengths', 'context_slots', 'labels'}
    np.testing.assert_array_equal(saved['labels'], 1)  # 'square', by name.
    assert saved['videos'].shape == (3, CAPACITY) + FRAME
    assert saved['context_slots'].dtype == np.int32 and saved['context_slots'].shape == (3, 1)
    np.testing.assert_array_equal(saved['context_slots'], 0)
    np.testing.assert_allclose(saved['videos'][:, 0] * 255.0,
                               np.broadcast_to(pixels, (3,) + FRAME), atol=1e-3)
  summary = json.loads(result.stdout[result.stdout.index('{'):])
  assert summary['task'] == 'i2v' and summary['sampler']['guidance_scale'] == 2.0
  assert summary['context_error'] <= 1e-5
  assert os.path.exists(output[:-len('.npz')] + '.png')
