"""How well one frame is the previous one seen by a moving camera: similarity alignment of frames.

A camera that pans, zooms and rolls over a flat scene moves the image by a similarity transform:
frame `t + 1` at pixel `p` shows what frame `t` shows at `A p + b`, with `A = s R(phi)` (scale
times rotation) and `b` a shift, in pixel coordinates centred on the frame (`x` right, `y` down).
`align` finds the best such transform for many frame pairs at once by Gauss-Newton
(Lucas-Kanade on the four parameters, coarse to fine), and reports what it leaves unexplained.
"""

import numpy as np
from scipy import ndimage

_BLURS = (1.5, 0.0)  # Gaussian sigmas (pixels) of the coarse-to-fine passes.
_ITERATIONS = 6  # Gauss-Newton steps per pass.
# A transform that keeps less than this share of the frame inside it is no camera motion between
# consecutive frames (it would "explain" any pair by comparing almost nothing).
MIN_OVERLAP = 0.5
_MAX_SCALE_CHANGE = 0.5  # Bounds on `a` and `r` that keep Gauss-Newton steps finite.


def _centred_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates x [H, W] and y [H, W] with the origin at the frame centre."""
  y, x = np.mgrid[:height, :width].astype(np.float64)
  return x - (width - 1) / 2, y - (height - 1) / 2


def warp(images: np.ndarray, matrix: np.ndarray, shift: np.ndarray):
  """Samples `images` at `A p + b` for every pixel p, bilinearly.

  Args:
    images: float [P, H, W, C].
    matrix: float [P, 2, 2], `A` acting on (x, y).
    shift: float [P, 2], `b`.

  Returns:
    (warped float [P, H, W, C], valid bool [P, H, W]: `A p + b` lies inside the frame).
  """
  p, h, w, c = images.shape
  x, y = _centred_grid(h, w)
  m, b = matrix[:, :, :, None, None], shift[:, :, None, None]
  col = m[:, 0, 0] * x + m[:, 0, 1] * y + b[:, 0] + (w - 1) / 2
  row = m[:, 1, 0] * x + m[:, 1, 1] * y + b[:, 1] + (h - 1) / 2
  valid = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
  col, row = np.clip(col, 0, w - 1), np.clip(row, 0, h - 1)
  c0 = np.minimum(np.floor(col).astype(int), w - 2)
  r0 = np.minimum(np.floor(row).astype(int), h - 2)
  fc, fr = (col - c0)[..., None], (row - r0)[..., None]
  flat = images.reshape(-1, c)
  index = (np.arange(p)[:, None, None] * h + r0) * w + c0  # Top-left neighbours, [P, H, W].
  top = flat[index] * (1 - fc) + flat[index + 1] * fc
  bottom = flat[index + w] * (1 - fc) + flat[index + w + 1] * fc
  return top * (1 - fr) + bottom * fr, valid


def _similarity(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(A [P, 2, 2], b [P, 2]) of parameters [P, 4] = (a, r, bx, by), A = [[1+a, -r], [r, 1+a]]."""
  a, r = params[:, 0], params[:, 1]
  matrix = np.stack([np.stack([1 + a, -r], -1), np.stack([r, 1 + a], -1)], -2)
  return matrix, params[:, 2:]


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
  return ndimage.gaussian_filter(images, (0, sigma, sigma, 0)) if sigma else images


def align(previous: np.ndarray, following: np.ndarray):
  """The similarity transforms that best map each `following` frame onto its `previous` frame.

  Args:
    previous: float [P, H, W, C] frames `t`.
    following: float [P, H, W, C] frames `t + 1`.

  Returns:
    matrix float [P, 2, 2] and shift float [P, 2] (`following(p) ~ previous(A p + b)`), and the
    root-mean-square residual float [P] over the pixels whose source lies inside the frame (all
    channels), in the images' units. A pair whose best transform keeps less than `MIN_OVERLAP` of
    the frame inside gets the residual of no motion instead.
  """
  previous = np.asarray(previous, np.float64)
  following = np.asarray(following, np.float64)
  p, h, w, _ = previous.shape
  x, y = _centred_grid(h, w)
  params = np.zeros((p, 4))
  for sigma in _BLURS:
    source, target = _blur(previous, sigma), _blur(following, sigma)
    grad_y, grad_x = np.gradient(source, axis=(1, 2))
    stacked = np.concatenate([source, grad_x, grad_y], axis=-1)
    for _ in range(_ITERATIONS):
      sampled, valid = warp(stacked, *_similarity(params))
      value, gx, gy = np.split(sampled, 3, axis=-1)
      residual = ((value - target) * valid[..., None]).reshape(p, -1)  # [P, H * W * C]
      jacobian = np.stack([gx * x[..., None] + gy * y[..., None],
                           -gx * y[..., None] + gy * x[..., None], gx, gy], axis=-1)
      jacobian = (jacobian * valid[..., None, None]).reshape(p, -1, 4)  # [P, H * W * C, 4]
      transposed = jacobian.transpose(0, 2, 1)
      hessian = transposed @ jacobian + 1e-6 * np.eye(4)
      gradient = transposed @ residual[..., None]
      params = params - np.linalg.solve(hessian, gradient)[..., 0]
      bound = np.array([_MAX_SCALE_CHANGE, _MAX_SCALE_CHANGE, w, h])
      params = np.clip(params, -bound, bound)
  matrix, shift = _similarity(params)
  sampled, valid = warp(previous, matrix, shift)
  squared = ((sampled - following) ** 2).mean(axis=-1) * valid
  rmse = np.sqrt(squared.sum(axis=(1, 2)) / np.maximum(valid.sum(axis=(1, 2)), 1))
  still = np.sqrt(((previous - following) ** 2).mean(axis=(1, 2, 3)))
  rmse = np.where(valid.mean(axis=(1, 2)) >= MIN_OVERLAP, rmse, still)
  return matrix, shift, rmse


def corner_displacement(matrix: np.ndarray, shift: np.ndarray, height: int,
                        width: int) -> np.ndarray:
  """How far the transforms move the frame's corners, float [P, 4, 2] in pixels."""
  corners = np.array([[-(width - 1) / 2, -(height - 1) / 2], [(width - 1) / 2, -(height - 1) / 2],
                      [-(width - 1) / 2, (height - 1) / 2], [(width - 1) / 2, (height - 1) / 2]])
  return np.einsum('pij,kj->pki', matrix, corners) + shift[:, None, :] - corners
