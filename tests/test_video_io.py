"""Video grids tile and upscale correctly; GIFs are complete files or nothing."""

import os

import numpy as np
from PIL import Image
import pytest

from flowception_jax.storage import video_io


def test_grid_shape_upscales_tiny_frames():
  videos = np.zeros((5, 4, 3, 3, 3), np.float32)
  grid = video_io.video_grid(videos, np.full(5, 4))
  # 3 columns x 2 rows of 48-pixel tiles (3x3 upscaled 16x) and 1-pixel separators.
  assert grid.shape == (4, 2 * 48 + 1, 3 * 48 + 2, 3)
  assert grid.dtype == np.uint8


def test_grid_places_tiles_and_greys_out_ended_videos():
  videos = np.zeros((2, 3, 2, 2, 1), np.float32)
  videos[1] = 1.0
  grid = video_io.video_grid(videos, np.array([3, 1]), columns=2, scale=2)
  assert grid.shape == (3, 4, 9, 3)
  assert (grid[:, :, :4] == 0).all()  # Video 0: black for all its frames.
  assert (grid[:, :, 4] == 255).all()  # Separator column.
  assert (grid[0, :, 5:] == 255).all()  # Video 1: white while alive...
  assert (grid[1:, :, 5:] == 128).all()  # ...grey once it has ended.


def test_grid_fills_missing_tiles_and_clips_values():
  videos = np.full((3, 1, 4, 4, 3), 2.0, np.float32)
  grid = video_io.video_grid(videos, np.ones(3), columns=2, scale=1)
  assert grid.shape == (1, 9, 9, 3)
  assert (grid[0, :4, :4] == 255).all()  # Clipped to 1.
  assert (grid[0, 5:, 5:] == 128).all()  # The empty fourth slot.


def test_grid_rejects_wrong_channels():
  with pytest.raises(ValueError):
    video_io.video_grid(np.zeros((1, 2, 4, 4, 4), np.float32), np.ones(1))


def _distinct_frames(t=5, h=10, w=12):
  frames = np.zeros((t, h, w, 3), np.uint8)
  for i in range(t):
    frames[i, :, :i + 1] = 255  # Each frame differs, so none is merged.
  return frames


def test_write_gif_round_trips_and_leaves_no_temp_files(tmp_path):
  path = os.path.join(tmp_path, 'samples.gif')
  video_io.write_gif(path, _distinct_frames())
  video_io.write_gif(path, _distinct_frames(t=7))  # Replaces an existing file.
  with Image.open(path) as gif:
    assert gif.n_frames == 7
    assert gif.size == (12, 10)
    gif.seek(3)
    pixels = np.asarray(gif.convert('RGB'))
    assert pixels[0, 3, 0] == 255 and pixels[0, 4, 0] == 0
  assert os.listdir(tmp_path) == ['samples.gif']


def test_write_gif_failure_leaves_no_file(tmp_path, monkeypatch):
  def crash(self, fp, *args, **kwargs):
    fp.write(b'GIF89a partial')
    raise OSError('disk full')

  monkeypatch.setattr(Image.Image, 'save', crash)
  with pytest.raises(OSError):
    video_io.write_gif(os.path.join(tmp_path, 'samples.gif'), _distinct_frames())
  assert not os.listdir(tmp_path)


def test_write_gif_rejects_float_frames(tmp_path):
  with pytest.raises(ValueError):
    video_io.write_gif(os.path.join(tmp_path, 'x.gif'), np.zeros((2, 4, 4, 3), np.float32))
  assert not os.listdir(tmp_path)


def test_write_png_round_trips_and_refuses_floats(tmp_path):
  image = _distinct_frames(t=1)[0]
  path = os.path.join(tmp_path, 'figure.png')
  video_io.write_png(path, image)
  with Image.open(path) as png:
    np.testing.assert_array_equal(np.asarray(png.convert('RGB')), image)
  with pytest.raises(ValueError):
    video_io.write_png(os.path.join(tmp_path, 'x.png'), image.astype(np.float32))
  assert os.listdir(tmp_path) == ['figure.png']
