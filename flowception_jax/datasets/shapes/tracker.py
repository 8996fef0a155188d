"""A tracker for the shapes set: each frame explained by the generator's own model.

A shapes clip is a flat background with up to two anti-aliased shapes (a disc, square or triangle of
half-extent `radius`) moving at constant velocity; every pixel is a convex mix of the background and
shape colours. `track` inverts that model for any video, real or sampled: per frame the background
colour (the frame's modal colour), each shape's visible coverage (the pixel's barycentric weight on
the video's palette), mask, centroid and colour, and a fit of the generator's shape (kind, radius,
box centre) that sees through the frame border and through occlusion. `fit_line` fits a shape's
constant-velocity path and `placement_error` says how well a placement explains a frame, so that
metrics (`metrics.py`) and task metrics can ask what moved where.

Tolerances come from the generator's constants:
- `COLOUR_TOL`: a sub-pixel sample changes a pixel's colour by at least `SHAPE_CONTRAST /
  SUPERSAMPLE^2`; a colour within half of that of a palette mix cannot be another anti-aliasing
  level, so it counts as that mix.
- `COVERAGE_EPS`: half a sub-pixel sample of coverage; less is not a shape.
- `POSITION_TOL`: one sub-pixel sample spacing, `1 / SUPERSAMPLE` pixels; a shape sampled on that
  grid is located to within it.
"""

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from flowception_jax.datasets.shapes import source as shapes

COLOUR_TOL = shapes.SHAPE_CONTRAST / (2 * shapes.SUPERSAMPLE**2)
COVERAGE_EPS = 1.0 / (2 * shapes.SUPERSAMPLE**2)
POSITION_TOL = 1.0 / shapes.SUPERSAMPLE

# Area of each kind over its squared half-extent, and its centroid minus its box centre (x, y) over
# the half-extent (the triangle's apex is at the top of its box, its base at the bottom).
_AREA = {'disc': np.pi, 'square': 4.0, 'triangle': 2.0}
_CENTROID_OFFSET = {'disc': (0.0, 0.0), 'square': (0.0, 0.0), 'triangle': (0.0, 1.0 / 3.0)}
_FINE_STEP = 1.0 / (4 * shapes.SUPERSAMPLE)  # Centre search step, a quarter sample spacing.
_MODE_CANDIDATES = 64  # Pixels tried as a frame's modal colour.


@dataclasses.dataclass(frozen=True)
class Tracks:
  """One video explained as a background and up to K shapes, frame by frame.

  Positions are (x, y) in pixels, pixel (row, col) covering [col, col + 1] x [row, row + 1], as in
  the generator. Shape k is the same object in every frame (it keeps its colour `colours[k]`).

  background: float32 [N, C] each frame's background colour.
  colours: float32 [K, C] the video's shape colours.
  coverage: float32 [N, K, H, W] visible coverage of each shape in [0, 1] (0 where hidden), set to
    0 or 1 within `COVERAGE_EPS` of either, on the shape's body: the 8-connected piece of its
    pixels (coverage >= `COVERAGE_EPS`) with the most coverage. Other pieces of its colour are
    speckle; they count in `foreground` and are left out of every fit.
  weights: float32 [N, K, H, W] 1 where a shape's coverage is seen, 0 where another shape's or its
    own speckle's colour is there (it may hide the shape). Fits compare coverage only where 1.
  clean: bool [N, H, W] pixels within `COLOUR_TOL` of a mix of the palette's colours.
  foreground: bool [N, H, W] pixels of any shape colour (coverage >= `COVERAGE_EPS`, speckle
    included) or not clean.
  present: bool [N, K] the shape has a body.
  whole: bool [N, K] present, off the frame border and apart from other shapes (fully visible).
  centroids: float32 [N, K, 2] coverage-weighted centroid of the visible part, NaN if absent.
  frame_colours: float32 [N, K, C] the shape's most saturated colour in frames where it is whole,
    measured in that frame alone; NaN elsewhere.
  kinds: K kind names of the fitted shapes (`shapes.KINDS`); radii: float32 [K] half-extents.
  centres: float32 [N, K, 2] fitted box centres (the generator's `centres`), NaN if absent.
  fit_error: float32 [N, K] sum of `weights` x |coverage - rendered coverage| at the fitted centre,
    in pixels of area; NaN if absent.
  """
  background: np.ndarray
  colours: np.ndarray
  coverage: np.ndarray
  weights: np.ndarray
  clean: np.ndarray
  foreground: np.ndarray
  present: np.ndarray
  whole: np.ndarray
  centroids: np.ndarray
  frame_colours: np.ndarray
  kinds: tuple[str, ...]
  radii: np.ndarray
  centres: np.ndarray
  fit_error: np.ndarray

  @property
  def masks(self) -> np.ndarray:
    """bool [N, K, H, W]: pixels mostly covered by each shape."""
    return self.coverage >= 0.5



def _bodies(coverage: np.ndarray) -> np.ndarray:
  """bool [N, K, H, W]: each shape's body in each frame (see `Tracks.coverage`)."""
  body = np.zeros(coverage.shape, bool)
  eight = np.ones((3, 3), bool)
  for index in np.ndindex(coverage.shape[:2]):
    labels, count = ndimage.label(coverage[index] >= COVERAGE_EPS, eight)
    if count:
      mass = ndimage.sum_labels(coverage[index], labels, np.arange(1, count + 1))
      body[index] = labels == 1 + np.argmax(mass)
  return body


def _within_tol(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Whether colours `a` and `b` [..., C] (broadcast) are within `COLOUR_TOL` in every channel."""
  near = np.abs(a[..., 0] - b[..., 0]) <= COLOUR_TOL
  for channel in range(1, a.shape[-1]):
    near &= np.abs(a[..., channel] - b[..., channel]) <= COLOUR_TOL
  return near


def _modal_colours(frames: np.ndarray) -> np.ndarray:
  """Each frame's most common colour [N, C] from its pixels [N, P, C].

  The mode is the candidate pixel with most pixels within `COLOUR_TOL` (L-inf); candidates are an
  evenly strided subset of the pixels. The result is the mean of the winner's neighbours, so it
  does not inherit one pixel's noise.
  """
  candidates = frames[:, ::max(1, frames.shape[1] // _MODE_CANDIDATES)]
  near = _within_tol(candidates[:, :, None], frames[:, None])  # [N, K, P]
  winner = near[np.arange(len(frames)), near.sum(axis=2).argmax(axis=1)]  # [N, P]
  return (frames * winner[..., None]).sum(axis=1) / winner.sum(axis=1, keepdims=True)


def _project(pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Nearest convex mixes of `palette` [V, C] (V <= 3) to `pixels` [P, C].

  Returns the barycentric weights [P, V] of the L2-nearest point of the palette's convex hull and
  the L-inf distance [P] to it.
  """
  v = len(palette)
  candidates = []  # Weights [P, V] of the nearest point on each face.
  for i in range(v):
    for j in range(i + 1, v):
      edge = palette[j] - palette[i]
      a = np.clip((pixels - palette[i]) @ edge / max(edge @ edge, 1e-12), 0.0, 1.0)
      w = np.zeros((len(pixels), v))
      w[:, i], w[:, j] = 1 - a, a
      candidates.append(w)
  if v == 3:
    basis = (palette[1:] - palette[0]).T  # [C, 2]
    ab, *_ = np.linalg.lstsq(basis, (pixels - palette[0]).T, rcond=None)
    w = np.concatenate([1 - ab.sum(axis=0, keepdims=True), ab]).T
    inside = np.all(w >= 0, axis=1, keepdims=True)
    candidates.append(np.where(inside, w, np.nan))
  if v == 1:
    candidates.append(np.ones((len(pixels), 1)))
  weights = np.stack(candidates)  # [F, P, V]
  residual = np.linalg.norm(pixels - weights @ palette, axis=-1)  # [F, P], NaN if outside a face.
  best = np.nanargmin(residual, axis=0)
  weights = weights[best, np.arange(len(pixels))]
  return weights, np.abs(pixels - weights @ palette).max(axis=-1)


def _palette(video: np.ndarray, max_shapes: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame backgrounds [N, C] and the video's shape colours [K, C].

  Every pixel of a clip is a convex mix of its palette, so the palette's colours are the extreme
  points of the pixel colours: each shape colour is the pixel farthest from the mixes of the colours
  found so far. To resist stray pixels, a shape colour must be seen at least twice (two pixels
  within the tolerance) and lie at least the generator's contrast (less the tolerance) from its
  frame's background.
  """
  n, h, w, c = video.shape
  background = _modal_colours(video.reshape(n, h * w, c))
  far = np.abs(video - background[:, None, None]).max(axis=-1) >= (
      shapes.SHAPE_CONTRAST - COLOUR_TOL)  # [N, H, W]
  colours = np.zeros((0, c), np.float32)
  while len(colours) < max_shapes:
    distance = np.stack([_project(frame, np.concatenate([bg[None], colours]))[1]
                         for frame, bg in zip(video.reshape(n, h * w, c), background)])
    candidates = far.reshape(n, -1) & (distance > COLOUR_TOL)
    pixels = video.reshape(n, h * w, c)[candidates]
    if not len(pixels):
      break
    pixels = pixels[np.argsort(-distance[candidates], kind='stable')]
    colour = None
    for first in range(0, len(pixels), _MODE_CANDIDATES):  # The farthest first.
      near = _within_tol(pixels[first:first + _MODE_CANDIDATES, None], pixels[None])
      seen_twice = np.flatnonzero(near.sum(axis=1) >= 2)
      if len(seen_twice):
        colour = pixels[near[seen_twice[0]]].mean(axis=0)
        break
    if colour is None:
      break
    colours = np.concatenate([colours, colour[None].astype(np.float32)])
  return background.astype(np.float32), colours


def _decompose(video: np.ndarray, background: np.ndarray,
               colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Visible coverage [N, K, H, W] of each shape colour (`Tracks.coverage`), and clean pixels
  bool [N, H, W]."""
  n, h, w, c = video.shape
  coverage = np.zeros((n, len(colours), h, w), np.float32)
  clean = np.zeros((n, h, w), bool)
  for t in range(n):
    weights, distance = _project(video[t].reshape(-1, c),
                                 np.concatenate([background[t][None], colours]))
    coverage[t] = weights[:, 1:].T.reshape(-1, h, w)
    clean[t] = (distance <= COLOUR_TOL).reshape(h, w)
  # Within half a sample of empty or full is empty or full, so fits do not sum the noise of
  # every background and interior pixel.
  coverage = np.where(coverage < COVERAGE_EPS, 0.0, np.where(coverage > 1 - COVERAGE_EPS, 1.0,
                                                             coverage))
  return coverage.astype(np.float32), clean


def _centroid(coverage: np.ndarray) -> np.ndarray:
  """Coverage-weighted centroid (x, y) of [..., H, W] maps; NaN where the coverage is empty."""
  h, w = coverage.shape[-2:]
  total = coverage.sum(axis=(-2, -1))
  with np.errstate(invalid='ignore', divide='ignore'):
    x = (coverage.sum(axis=-2) * (np.arange(w) + 0.5)).sum(axis=-1) / total
    y = (coverage.sum(axis=-1) * (np.arange(h) + 0.5)).sum(axis=-1) / total
  return np.stack([x, y], axis=-1)


def _grid_search(kind: str, radius: float, coverage: np.ndarray, weight: np.ndarray,
                 low: np.ndarray, high: np.ndarray, step: float) -> tuple[np.ndarray, float]:
  """The box centre in [low, high] (x, y) on a `step` grid whose rendering best matches `coverage`.

  The error is the weighted L1 distance between coverages [H, W]; among equally good centres (a
  sampled shape does not move its coverage between samples) the mean is returned.
  """
  axes = [np.arange(lo, hi + step / 2, step) for lo, hi in zip(low, high)]
  grid = np.stack(np.meshgrid(*axes), axis=-1).reshape(-1, 2)
  rendered = shapes.coverage(kind, grid, radius, coverage.shape[-1])
  errors = (np.abs(rendered - coverage) * weight).sum(axis=(1, 2))
  best = errors <= errors.min() + 1e-6
  return grid[best].mean(axis=0), float(errors.min())


def _fit_centre(kind: str, radius: float, coverage: np.ndarray, weight: np.ndarray,
                hidden_sides: np.ndarray, fine: bool = True) -> tuple[np.ndarray, float]:
  """Box centre (x, y) and error of a shape of `kind` and `radius` seen as `coverage` [H, W].

  A fully visible shape is placed by its centroid. Otherwise the search starts there and reaches
  a radius and a pixel further on each side where the shape may be hidden: `hidden_sides` bool
  [2, 2] (axis, low/high side), where it touches the frame border or another shape. Grids of 1
  pixel, then `POSITION_TOL`, then (if `fine`) a quarter of that narrow it down.
  """
  start = _centroid(coverage) - np.array(_CENTROID_OFFSET[kind]) * radius
  if not hidden_sides.any():
    return _grid_search(kind, radius, coverage, weight, start, start, 1.0)
  reach = np.where(hidden_sides, radius + 1.0, 0.0)  # [2, 2]
  centre, error = _grid_search(kind, radius, coverage, weight, start - reach[:, 0],
                               start + reach[:, 1], 1.0)
  # (step, reach): each grid covers the cells next to the best centre of the one before.
  refinements = ((POSITION_TOL, 1.0), (_FINE_STEP, POSITION_TOL - _FINE_STEP))
  for step, reach in refinements[:2 if fine else 1]:
    centre, error = _grid_search(kind, radius, coverage, weight, centre - reach, centre + reach,
                                 step)
  return centre, error


def _median_of_best(radii: np.ndarray, errors) -> float:
  """The median of the radii whose error is least (sampling hides small changes of radius)."""
  errors = np.asarray(errors)
  tied = radii[errors <= errors.min() + 1e-6]
  return float(tied[len(tied) // 2])


def _fit_shape(coverage: np.ndarray, weight: np.ndarray, hidden_sides: np.ndarray,
               whole: np.ndarray) -> tuple[str, float]:
  """Kind and radius of one shape seen as `coverage` [N, H, W].

  Fully visible frames fix both: each kind's radius follows from their mean area, and the kind and
  radius (within half a sample spacing of that) whose renderings at the frames' centroids match
  best win; several frames sample the outline at several sub-pixel phases. A shape never fully
  visible is placed coarsely in its most visible frame for each kind and radius of the generator's
  (from the one its visible area needs), and the best radius is then refined.
  """
  size = coverage.shape[-1]
  area = coverage.sum(axis=(1, 2))
  if whole.any():
    centroids = _centroid(coverage[whole])
    fits = []  # (least error, kind, radius) per kind.
    for kind in shapes.KINDS:
      radii = np.sqrt(area[whole].mean() / _AREA[kind]) + np.arange(-4, 5) * _FINE_STEP / 2
      errors = [np.abs(shapes.coverage(kind, centroids - np.array(_CENTROID_OFFSET[kind]) * r, r,
                                       size) - coverage[whole]).sum() for r in radii]
      fits.append((min(errors), kind, _median_of_best(radii, errors)))
    _, kind, radius = min(fits, key=lambda fit: fit[0])
    return kind, radius
  ref = int(np.argmax(area))
  low, high = np.array(shapes.SHAPE_RADIUS) * size
  coarse = []  # (error, kind, radius)
  for kind in shapes.KINDS:
    smallest = max(low, np.sqrt(area[ref] / _AREA[kind]) - POSITION_TOL)  # It is at least as large.
    for r in np.arange(smallest, max(smallest, high) + POSITION_TOL / 2, POSITION_TOL):
      error = _fit_centre(kind, r, coverage[ref], weight[ref], hidden_sides[ref], fine=False)[1]
      coarse.append((error, kind, r))
  _, kind, radius = min(coarse, key=lambda fit: fit[0])
  radii = radius + np.arange(-4, 5) * _FINE_STEP / 2
  errors = [_fit_centre(kind, r, coverage[ref], weight[ref], hidden_sides[ref])[1] for r in radii]
  return kind, _median_of_best(radii, errors)


def track(video: np.ndarray, max_shapes: int = 2) -> Tracks:
  """Explains `video` float [N, H, W, C] in [0, 1] (its valid frames only) as `Tracks`."""
  video = np.asarray(video, np.float32)
  if video.ndim != 4 or video.shape[1] != video.shape[2] or not len(video):
    raise ValueError(f'expected a video [N >= 1, S, S, C], got {video.shape}')
  n, h, w, c = video.shape
  background, colours = _palette(video, max_shapes)
  k = len(colours)
  coverage, clean = _decompose(video, background, colours)
  colour_pixels = coverage >= COVERAGE_EPS
  body = _bodies(coverage)
  coverage = np.where(body, coverage, 0.0).astype(np.float32)
  present = body.any(axis=(2, 3))
  other = np.zeros_like(colour_pixels)  # [N, K, H, W] pixels of the other shapes' colours.
  for j in range(k):
    other[:, j] = colour_pixels[:, np.arange(k) != j].any(axis=1)
  weight = (~other & ~(colour_pixels & ~body)).astype(np.float32)
  near_other = ndimage.binary_dilation(other.reshape(-1, h, w), np.ones((1, 3, 3), bool))
  near_other = near_other.reshape(other.shape)
  hidden_sides = np.stack([
      np.stack([body[..., :, 0].any(-1), body[..., :, -1].any(-1)], axis=-1),
      np.stack([body[..., 0, :].any(-1), body[..., -1, :].any(-1)], axis=-1)], axis=-2)
  hidden_sides |= (body & near_other).any(axis=(2, 3))[..., None, None]
  whole = present & ~hidden_sides.any(axis=(2, 3))

  frame_colours = np.full((n, k, c), np.nan, np.float32)
  for t, j in zip(*np.nonzero(whole & (coverage >= 0.5).any(axis=(2, 3)))):
    pixels = video[t][coverage[t, j] >= 0.5]
    distance = np.abs(pixels - background[t]).max(axis=-1)
    frame_colours[t, j] = pixels[distance >= distance.max() - COLOUR_TOL].mean(axis=0)

  kinds, radii = [], []
  centres = np.full((n, k, 2), np.nan, np.float32)
  fit_error = np.full((n, k), np.nan, np.float32)
  for j in range(k):
    kind, radius = _fit_shape(coverage[:, j], weight[:, j], hidden_sides[:, j], whole[:, j])
    kinds.append(kind)
    radii.append(radius)
    for t in np.flatnonzero(present[:, j]):
      centres[t, j], fit_error[t, j] = _fit_centre(kind, radius, coverage[t, j], weight[t, j],
                                                   hidden_sides[t, j])
  return Tracks(background=background, colours=colours, coverage=coverage, weights=weight,
                clean=clean, foreground=colour_pixels.any(axis=1) | ~clean,
                present=present, whole=whole,
                centroids=_centroid(coverage).astype(np.float32),
                frame_colours=frame_colours, kinds=tuple(kinds), radii=np.array(radii, np.float32),
                centres=centres, fit_error=fit_error)


def _line_error(kind: str, radius: float, coverage: np.ndarray, weight: np.ndarray,
                times: np.ndarray, params: np.ndarray) -> float:
  """Summed weighted L1 error of renderings at `params[:2] + times * params[2:]` vs `coverage`."""
  centres = params[:2] + times[:, None] * params[2:]
  rendered = shapes.coverage(kind, centres, radius, coverage.shape[-1])
  return float((np.abs(rendered - coverage) * weight).sum())


def fit_line(tracks: Tracks, j: int) -> tuple[np.ndarray, np.ndarray]:
  """Constant-velocity path of shape j: box centre (x, y) at frame 0 and velocity (x, y) per frame.

  A least-squares fit of the fitted centres, frames weighed by visible area (a sliver or an
  occluded shape is placed ambiguously), is refined by a pattern search on the summed rendering
  error of all frames when some centre is off it, so the path explains the frames themselves. A
  shape seen once stands still; NaN if it is never seen.
  """
  seen = np.flatnonzero(tracks.present[:, j])
  centres = tracks.centres[seen, j].astype(np.float64)
  if len(seen) < 2:
    return (centres[0] if len(seen) else np.full(2, np.nan)), np.zeros(2)
  area = np.sqrt(tracks.coverage[seen, j].sum(axis=(1, 2)))[:, None]
  middle = seen.mean()
  times = seen - middle
  design = np.stack([np.ones(len(seen)), times], axis=1) * area
  params = np.linalg.lstsq(design, centres * area, rcond=None)[0].ravel()  # (x, y, vx, vy).
  if np.abs(params[:2] + times[:, None] * params[2:] - centres).max() > POSITION_TOL:
    cost = functools.partial(_line_error, tracks.kinds[j], tracks.radii[j],
                             tracks.coverage[seen, j], tracks.weights[seen, j], times)
    best, step, span = cost(params), POSITION_TOL, max(np.abs(times).max(), 1.0)
    while step >= _FINE_STEP:
      moves = np.concatenate([np.eye(4), -np.eye(4)]) * step * np.array([1, 1, 1 / span, 1 / span])
      error, i = min((cost(params + move), i) for i, move in enumerate(moves))
      if error < best:
        best, params = error, params + moves[i]
      else:
        step /= 2
  return params[:2] - middle * params[2:], params[2:]


def placement_error(tracks: Tracks, t: int, j: int, centre: np.ndarray, reach: float) -> float:
  """The least `fit_error` of shape j in frame t over box centres within `reach` of `centre`."""
  weight = tracks.weights[t, j]
  _, error = _grid_search(tracks.kinds[j], tracks.radii[j], tracks.coverage[t, j], weight,
                          centre - reach, centre + reach, _FINE_STEP)
  return error
