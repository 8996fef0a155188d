"""Video grids, GIF and PNG files for looking at samples, data and figures."""

import numpy as np
from PIL import Image

from flowception_jax.storage import files

MIN_TILE = 48  # Default upscaling makes each tile at least this many pixels on its short side.
_ENDED = 128  # Grey shown in a tile once its video has ended.
_SEPARATOR = 255  # White 1-pixel lines between tiles.


def video_grid(videos: np.ndarray, lengths: np.ndarray, columns: int | None = None,
               scale: int | None = None) -> np.ndarray:
  """Tiles a batch of videos into one video, row-major, with 1-pixel separators.

  Args:
    videos: float [B, N, H, W, C] in [0, 1] (clipped), C 1 or 3.
    lengths: int [B]; frames at or past a video's length show as grey.
    columns: tiles per row; default about the square root of B.
    scale: integer nearest-neighbour upscaling; default the smallest that makes tiles at least
      `MIN_TILE` pixels, so 3x3 frames are visible.

  Returns:
    uint8 [N, R * H * scale + R - 1, columns * W * scale + columns - 1, 3], `R` the number of rows.
  """
  videos = np.asarray(videos, np.float32)
  lengths = np.asarray(lengths)
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3) or lengths.shape != videos.shape[:1]:
    raise ValueError(f'expected videos [B, N, H, W, 1 or 3] and lengths [B], got {videos.shape} '
                     f'and {lengths.shape}')
  b, n, h, w, _ = videos.shape
  columns = columns or int(np.ceil(np.sqrt(b)))
  rows = -(-b // columns)
  scale = scale or max(1, -(-MIN_TILE // min(h, w)))
  pixels = np.round(np.clip(videos, 0.0, 1.0) * 255).astype(np.uint8)
  pixels = np.broadcast_to(pixels, (b, n, h, w, 3))
  alive = np.arange(n)[None, :] < lengths[:, None]
  tiles = np.where(alive[:, :, None, None, None], pixels, np.uint8(_ENDED))
  tiles = np.concatenate([tiles, np.full((rows * columns - b, n, h, w, 3), _ENDED, np.uint8)])
  tiles = tiles.repeat(scale, axis=2).repeat(scale, axis=3)
  tiles = np.pad(tiles, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)), constant_values=_SEPARATOR)
  th, tw = tiles.shape[2:4]
  grid = tiles.reshape(rows, columns, n, th, tw, 3).transpose(2, 0, 3, 1, 4, 5)
  return grid.reshape(n, rows * th, columns * tw, 3)[:, :-1, :-1]


def write_gif(path: str, frames: np.ndarray, fps: float = 8) -> None:
  """Writes uint8 [T, H, W, 3] frames as a looping GIF, atomically.

  GIF encoders merge identical consecutive frames (adding their durations), so a reader may count
  fewer frames while the timing is kept.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f'expected uint8 frames [T >= 1, H, W, 3], got {frames.dtype} {frames.shape}')
  images = [Image.fromarray(frame) for frame in frames]
  files.write_with(path, lambda f: images[0].save(
      f, format='GIF', save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0))


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image as a PNG, atomically."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}')
  files.write_with(path, lambda f: Image.fromarray(image).save(f, format='PNG'))


_MARK = (230, 40, 40)  # Red border of marked frames in a filmstrip.


def filmstrip(videos: np.ndarray, lengths: np.ndarray, marked: np.ndarray | None = None,
              scale: int | None = None) -> np.ndarray:
  """One picture of a batch of videos: a row per video, its frames from left to right.

  Args:
    videos: float [B, N, H, W, C] in [0, 1].
    lengths: int [B]; frames at or past a video's length show as grey.
    marked: bool [B, N] frames framed in red (e.g. the frames given to a task), or None.
    scale: integer upscaling, as in `video_grid`.

  Returns:
    uint8 [B * (H * scale + 1) - 1, N * (W * scale + 1) - 1, 3].
  """
  videos = np.asarray(videos, np.float32)
  b, n = videos.shape[:2]
  alive = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
  picture = np.array(video_grid(videos.reshape((b * n, 1) + videos.shape[2:]),
                                alive.reshape(-1).astype(np.int32), columns=n, scale=scale)[0])
  if marked is not None:
    th, tw = (picture.shape[0] + 1) // b, (picture.shape[1] + 1) // n  # Tile plus separator.
    width = max(1, (th - 1) // 16)
    for row, col in zip(*np.nonzero(np.asarray(marked))):
      tile = picture[row * th:(row + 1) * th - 1, col * tw:(col + 1) * tw - 1]
      tile[:width], tile[-width:], tile[:, :width], tile[:, -width:] = _MARK, _MARK, _MARK, _MARK
  return picture
