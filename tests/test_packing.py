"""Packed rows: several clips per row, each as if alone (pipeline, attention, losses, resumption)."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowception_jax.core import flowception
from flowception_jax.core import model as model_lib
from flowception_jax.training import input_pipeline
from flowception_jax.training import train
from tests import tiny_params

BUCKETS = (4, 8, 12)
MAX_FRAMES = 12
H, W, C = 8, 8, 3


class CountingSource:
  """Videos of 2..MAX_FRAMES frames: pixel (0, 0) holds the record, pixel (0, 1) the frame index."""

  def __len__(self):
    return 40

  def __getitem__(self, index):
    n = 2 + (5 * index) % (MAX_FRAMES - 1)
    rng = np.random.default_rng(index)
    video = rng.uniform(size=(n, H, W, C)).astype(np.float32)
    video[:, 0, 0, 0] = (index + 1) / 64
    video[:, 0, 1, 0] = (np.arange(n) + 1) / 64
    return {'video': video, 'label': np.int32(index % 3)}


def _data_config(**fields):
  return ml_collections.ConfigDict(
      dict(buckets=BUCKETS, num_threads=0, prefetch=4, packing=True, pack_frames=0) | fields)


def _flow_config(**fields):
  return ml_collections.ConfigDict(dict(
      kappa='linear', num_start_frames=2, tau_distribution='uniform', snr_shift=1.0,
      velocity_weighting='uniform', velocity_weight_loc=0.0, velocity_weight_scale=1.0,
      p_uncond=0.0, rate_weight=1.0, loss_normalisation='clip') | fields)


def _dataset(seed=0, batch_size=4, method='flowception', **fields):
  return input_pipeline.make_train_dataset(CountingSource(), _data_config(**fields), _flow_config(),
                                           batch_size=batch_size, seed=seed, max_frames=MAX_FRAMES,
                                           method=method)


def _clips(batch):
  """(row, slots of one clip) for every clip of a packed batch."""
  for b, ids in enumerate(batch['segment_ids']):
    for segment in np.unique(ids[ids > 0]):
      yield b, np.flatnonzero(ids == segment)


@pytest.mark.parametrize('method', ['flowception', 'full_sequence', 'autoregressive',
                                    'autoregressive_noncausal'])
def test_rows_hold_whole_clips_each_restarting_its_positions(method):
  batches = list(itertools.islice(iter(_dataset(method=method)), 6))
  size = max(input_pipeline.slot_counts(method, BUCKETS))
  per_row = []
  for batch in batches:
    assert batch['frames'].shape == (4, size, H, W, C)
    np.testing.assert_array_equal(batch['frame_mask'], batch['segment_ids'] > 0)
    for key in ('frames', 'frame_times', 'insert_targets'):  # Padding is zero.
      assert not batch[key][~batch['frame_mask']].any(), key
    per_row.append(batch['segment_ids'].max(axis=1))
    for b, slots in _clips(batch):
      assert np.all(np.diff(slots) == 1)  # A clip's slots are contiguous.
      record = np.rint((batch['frames'][b, slots, 0, 0, 0] + 1) / 2 * 64).astype(int) - 1
      assert np.all(record == record[0])  # One source video per segment.
      length = batch['length'][b, slots]
      assert np.all(length == length[0]) and np.all(batch['label'][b, slots] == record[0] % 3)
      if method == 'flowception':
        np.testing.assert_array_equal(batch['positions'][b, slots], np.arange(len(slots)))
        # Frame conservation: visible frames plus the frames each gap must insert make the clip.
        assert len(slots) + batch['insert_targets'][b, slots].sum() == length[0]
        assert batch['flow_mask'][b, slots].any()
      if method == 'autoregressive':  # Clean frames, then their noisy copies, in one segment.
        np.testing.assert_array_equal(batch['positions'][b, slots],
                                      np.tile(np.arange(len(slots) // 2), 2))
      if method == 'autoregressive_noncausal':  # A clean prefix, then at most the frame to make.
        np.testing.assert_array_equal(batch['positions'][b, slots], np.arange(len(slots)))
        np.testing.assert_array_equal(batch['flow_mask'][b, slots[:-1]], False)
  assert np.concatenate(per_row).max() >= 2  # Rows do hold several clips.


def test_pack_frames_below_the_largest_example_is_refused():
  with pytest.raises(ValueError, match='--config.data.pack_frames'):
    _dataset(pack_frames=8)


@pytest.mark.parametrize('num_threads', [0, 2])
def test_resume_is_exact(num_threads):
  iterator = iter(_dataset(seed=1, num_threads=num_threads))
  list(itertools.islice(iterator, 3))
  state = iterator.get_state()
  expected = list(itertools.islice(iterator, 4))
  restored = iter(_dataset(seed=1, num_threads=num_threads))
  restored.set_state(state)
  for want, got in zip(expected, itertools.islice(restored, 4)):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('local_mixing', [False, True])
def test_a_packed_row_gives_each_clip_the_loss_it_gets_alone(local_mixing):
  batch = next(b for b in iter(_dataset(batch_size=2))
               if (b['segment_ids'].max(axis=1) >= 2).all())
  net = model_lib.DiT(patch_size=4, channels=C, hidden_size=32, depth=2, num_heads=2,
                      num_classes=3, local_mixing=local_mixing)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=batch['frames'].shape).astype(np.float32)
  flow = _flow_config()

  @jax.jit
  def losses(params, rows, noise):
    """Outputs and (velocity, rate) losses of rows, from the given noise."""
    t = rows['frame_times'][..., None, None, None]
    x_t = jnp.where(rows['context_mask'][..., None, None, None], rows['frames'],
                    t * rows['frames'] + (1 - t) * noise)
    labels = jnp.asarray(rows['label'])
    velocity, log_rate = net.apply(
        {'params': params}, *train.model_inputs(rows, x_t, rows['frame_times'], labels),
        frame_attention=train.frame_attention_of(rows, method='flowception', packed=True))
    segments = train.loss_segments(rows, flow)
    return velocity, log_rate, (
        flowception.velocity_loss(velocity, rows['frames'] - noise, rows['flow_mask'], None,
                                  segments),
        flowception.rate_loss(log_rate, rows['insert_targets'], rows['rate_mask'], segments))

  # Perturbed, so the zero-initialised heads and gates carry signal.
  params = tiny_params.perturbed_init(net, *model_lib.init_inputs((H, W, C), 4, 3))['params']
  velocity, log_rate, packed = jax.device_get(losses(params, batch, x0))
  alone = []
  for b, slots in _clips(batch):
    row = {k: v[b:b + 1, slots] for k, v in batch.items()}
    row['segment_ids'] = np.ones_like(row['segment_ids'])
    v, r, clip_losses = jax.device_get(losses(params, row, x0[b:b + 1, slots]))
    np.testing.assert_allclose(v[0], velocity[b, slots], atol=1e-5)
    np.testing.assert_allclose(r[0], log_rate[b, slots], atol=1e-5)
    alone.append(clip_losses)
  # The row's losses are the mean of its clips' (clips without a term's frames do not count).
  for term, (got, clip_values) in enumerate(zip(packed, zip(*alone))):
    masks = ['flow_mask', 'rate_mask'][term]
    counted = [float(value) for (b, slots), value in zip(_clips(batch), clip_values)
               if batch[masks][b, slots].any()]
    np.testing.assert_allclose(float(got), np.mean(counted), rtol=1e-5)
  # Without the segment mask, clips would see each other.
  inputs = train.model_inputs(batch, batch['frames'], batch['frame_times'],
                              jnp.asarray(batch['label']))
  leaky = tiny_params.apply(net, {'params': params}, *inputs)[0]
  assert np.abs(np.asarray(leaky) - np.asarray(tiny_params.apply(
      net, {'params': params}, *inputs, frame_attention=train.frame_attention_of(
          batch, method='flowception', packed=True))[0])).max() > 1e-4


def test_masked_mean_per_clip_matches_brute_force():
  rng = np.random.default_rng(3)
  values = rng.normal(size=(3, 7)).astype(np.float32)
  segment_ids = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0, 0]])
  mask = (rng.uniform(size=(3, 7)) < 0.7) & (segment_ids > 0)
  mask[2, 1] = False  # Clip 2 of row 2 has no masked frame: it does not count.
  clip_means = [values[b][(segment_ids[b] == s) & mask[b]].mean()
                for b in range(3) for s in range(1, 4)
                if ((segment_ids[b] == s) & mask[b]).any()]
  got = flowception.masked_mean(jnp.asarray(values), jnp.asarray(mask), jnp.asarray(segment_ids))
  np.testing.assert_allclose(float(got), np.mean(clip_means), rtol=1e-6)
  assert float(flowception.mean_count(jnp.asarray(mask), jnp.asarray(segment_ids))) == len(
      clip_means)
  np.testing.assert_allclose(float(flowception.masked_mean(jnp.asarray(values), jnp.asarray(mask))),
                             values[mask].mean(), rtol=1e-6)
  assert float(flowception.masked_mean(jnp.asarray(values), jnp.zeros((3, 7), bool),
                                       jnp.asarray(segment_ids))) == 0.0


def test_data_shards_pack_rows_of_one_shape_from_their_own_clips():
  config = _data_config()
  shards = [next(iter(input_pipeline.make_train_dataset(CountingSource(), config, _flow_config(),
                                                        batch_size=2, seed=0, max_frames=MAX_FRAMES,
                                                        shard=(index, 2))))
            for index in range(2)]
  assert shards[0]['frames'].shape == shards[1]['frames'].shape
  records = [set(np.rint((b['frames'][b['frame_mask']][:, 0, 0, 0] + 1) / 2 * 64).astype(int))
             for b in shards]
  assert not records[0] & records[1]  # Each process reads its own block of the stream.
