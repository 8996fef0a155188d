"""Checkpoints of the train state, the input-pipeline position and the config, with Orbax.

Each checkpoint is an Orbax composite of four items: `state` (the train state pytree), `data` (the
Grain iterator state, so a resumed run reads exactly the batches an uninterrupted one would),
`config` (the resolved config, so sampling and resumption know what the weights are) and
`manifest` (the shape, dtype and checksum of every state array, and a checksum of the config).
Every restore first compares the arrays the code expects with the manifest (a mismatch is a
`CheckpointMismatchError`, not damage), then the restored values with their checksums.

What can go wrong, and what happens:
- A save killed at any moment (SIGKILL, power loss of the process) leaves only Orbax's temporary
  directory `<step>.orbax-checkpoint-tmp`, which is renamed to `<step>` once complete; listings
  skip it and the next writing manager removes it.
- A complete checkpoint whose files were later truncated or overwritten: Orbax raises on most such
  damage, but reads a flipped byte inside an array's data without noticing; the checksums catch it.
  `restore_latest` warns, names the checkpoint, falls back to the previous one and moves the bad
  one aside; if none is usable it raises and changes nothing. Checkpoints written without a
  manifest are restored unchecked.
- A write that fails (full disk, lost permission): the checkpoint stays temporary, never trusted,
  and `save` or `wait` raise one `CheckpointError` that names it.
"""

from collections.abc import Mapping
import json
import os
import re
import tempfile
from typing import Any
import zlib

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from flowception_jax.training import config as config_lib

# Config fields that determine the shapes of the parameters or the meaning of the weights.
_ARCHITECTURE_FIELDS = ('method', 'data.name', 'data.image_size', 'model.size', 'model.patch_size',
                        'model.mlp_ratio', 'model.attn_window')


CORRUPT_DIR = 'corrupt_checkpoints'  # Where unusable checkpoints are moved, inside the workdir.


class CheckpointError(Exception):
  """A checkpoint that cannot be written or read; the message names it and the way out."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays are not those the current code and config build."""


def make_manager(workdir: str, *, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`; a writing one first removes unfinished temporary saves."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         cleanup_tmp_directories=not read_only)
  root = workdir if '://' in workdir else os.path.abspath(workdir)  # gs://... stays as it is.
  return ocp.CheckpointManager(os.path.join(root, 'checkpoints'),
                               options=options, item_names=('state', 'data', 'config', 'manifest'))


def check_writable(workdir: str) -> None:
  """Creates `workdir` and writes a probe file there, so a bad workdir fails before any work."""
  try:
    if '://' in workdir:  # Object stores (gs://...): a probe object written and removed.
      probe = epath.Path(workdir) / f'.write_probe_{os.getpid()}'
      probe.write_bytes(bytes(1 << 16))
      probe.unlink()
      return
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir) as probe:
      probe.write(bytes(1 << 16))
      probe.flush()
      os.fsync(probe.fileno())
  except OSError as e:
    raise CheckpointError(f'cannot write to the workdir {workdir}: {_reason(e)}; choose a '
                          '--workdir you can write to, on a disk with free space') from e


def _chain(error: BaseException):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def _reason(error: BaseException) -> str:
  """Why an operation failed, in one line: the operating system's error if there is one."""
  if isinstance(error, (CheckpointError, CheckpointMismatchError)):
    return str(error)
  for e in _chain(error):
    if isinstance(e, OSError) and e.strerror:
      return e.strerror
    code = re.search(r"os_error_code='(\d+)'", str(e))  # TensorStore's form of an OS error.
    if code:
      return os.strerror(int(code.group(1)))
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'.rstrip(': ')


def _write_failure(manager: ocp.CheckpointManager, step: int | None, error: BaseException) -> str:
  complete = [s for s in manager.all_steps() if s != step]
  return (f'could not write the checkpoint of step {step} in {manager.directory}: '
          f'{_reason(error)}. That checkpoint is incomplete and will not be used; the complete ones '
          f'({", ".join(map(str, complete)) or "none"}) are kept. Free disk space in (or restore '
          'access to) the workdir and run the same command again to resume')


def _damaged(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  return (f'checkpoint {_step_dir(manager, step)} is unusable: {_reason(error)}; resuming training '
          'in its workdir moves it aside and continues from the previous one')


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 elements (narrow types widened, 64-bit types split in two)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_checksums(tree: Any) -> Any:
  """Per leaf, `sum_i bits_i * (2 i + 1)` modulo 2^32 over the flattened bits.

  The odd weights are invertible modulo 2^32, so any single changed element changes the sum; the
  integer sum is exact in any order, so it does not depend on the sharding.
  """

  def checksum(x):
    bits = _as_uint32(x)
    weights = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * 2 + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)

  return jax.tree.map(checksum, tree)


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in path)


def checksums(tree: Any) -> dict[str, int]:
  """Checksums of the arrays of `tree` (sharded or not) by leaf path, e.g. `params/block_0/...`."""
  sums = _leaf_checksums(tree)
  return {_leaf_name(path): int(np.asarray(value.addressable_data(0)))
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _layout(tree: Any) -> dict[str, tuple[list[int], str]]:
  """(shape, dtype) of every array (or abstract array) of `tree` by leaf path."""
  return {_leaf_name(path): (list(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _config_checksum(config_dict: Mapping) -> int:
  return zlib.crc32(json.dumps(config_dict, sort_keys=True).encode())


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _read_manifest(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The manifest saved with `step`, or None for a checkpoint written without one."""
  if not (epath.Path(_step_dir(manager, step)) / 'manifest').is_dir():
    return None
  return manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))[
      'manifest']


def _check_layout(manager: ocp.CheckpointManager, step: int, manifest: dict | None,
                  abstract: Any) -> None:
  """Raises a CheckpointMismatchError unless the arrays of `abstract` are the saved ones.

  `abstract` may cover part of the state (its leaf paths are compared with the saved paths that
  share their first component).
  """
  if manifest is None:
    return
  expected = _layout(abstract)
  roots = {name.split('/')[0] for name in expected}
  saved = {name: (entry['shape'], entry['dtype']) for name, entry in manifest['arrays'].items()
           if name.split('/')[0] in roots}
  if expected == saved:
    return
  differences = [f'{name}: saved {saved[name][0]} {saved[name][1]}, expected {expected[name][0]} '
                 f'{expected[name][1]}' for name in sorted(set(saved) & set(expected))
                 if saved[name] != expected[name]]
  differences += [f'{name}: not in the checkpoint' for name in sorted(set(expected) - set(saved))]
  differences += [f'{name}: only in the checkpoint' for name in sorted(set(saved) - set(expected))]
  raise CheckpointMismatchError(
      f'checkpoint {_step_dir(manager, step)} holds other arrays than this code and config build '
      f'({len(differences)} differ: {"; ".join(differences[:3])}{"; ..." * (len(differences) > 3)}'
      '); use the code version and config it was trained with, or train in a new --workdir')


def _verify(restored: Any, manifest: dict | None) -> None:
  """Raises a CheckpointError if an array of `restored` differs from its saved checksum."""
  if manifest is None:
    return
  differ = sorted(name for name, value in checksums(restored).items()
                  if manifest['arrays'][name]['checksum'] != value)
  if differ:
    raise CheckpointError(f'{len(differ)} arrays differ from the checksums saved with them '
                          f'({", ".join(differ[:3])}{", ..." if len(differ) > 3 else ""})')


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the pending asynchronous save is complete; a failed write is a CheckpointError."""
  step = manager.latest_step()
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise CheckpointError(_write_failure(manager, step, e)) from e


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator, config) -> None:
  """Starts an asynchronous save of `step` once the previous one is complete (see `wait`)."""
  wait(manager)
  sums = checksums(state)
  manifest = {'arrays': {name: {'shape': shape, 'dtype': dtype, 'checksum': sums[name]}
                         for name, (shape, dtype) in _layout(state).items()},
              'config': _config_checksum(config.to_dict())}
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict()),
        manifest=ocp.args.JsonSave(manifest)))
  except Exception as e:
    raise CheckpointError(_write_failure(manager, step, e)) from e


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """`saved` plus the fields it lacks, taken from `defaults` (nested dicts merged)."""
  merged = dict(saved)
  for key, value in defaults.items():
    if key not in merged:
      merged[key] = value
    elif isinstance(value, dict) and isinstance(merged[key], dict):
      merged[key] = _with_defaults(merged[key], value)
  return merged


def _restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manifest = _read_manifest(manager, step)
  if manifest is not None and manifest['config'] != _config_checksum(restored['config']):
    raise CheckpointError('the config differs from the checksum saved with it')
  return ml_collections.ConfigDict(
      _with_defaults(restored['config'], config_lib.base_config().to_dict()))


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config saved with `step`, checked against its checksum (a CheckpointError names a damaged
  one); fields added to `base_config` since then take their defaults."""
  try:
    return _restore_config(manager, step)
  except Exception as e:
    raise CheckpointError(_damaged(manager, step, e)) from e


def _get(config: Mapping, dotted: str):
  for key in dotted.split('.'):
    config = config[key]
  return config


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     workdir: str) -> None:
  """Refuses to resume from weights trained for a different architecture or dataset."""
  diffs = [f'{f}: checkpoint {_get(saved, f)!r} vs config {_get(config, f)!r}'
           for f in _ARCHITECTURE_FIELDS if json.dumps(_get(saved, f)) != json.dumps(_get(config, f))]
  if diffs:
    raise ValueError(f'the checkpoint in {workdir} belongs to an incompatible config ('
                     + '; '.join(diffs) + '); use a new --workdir or the config it was trained with')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator):
  """Restores the train state (sharded like `abstract_state`) and moves `data_iterator` in place.

  Raises a CheckpointMismatchError if the saved arrays are not those of `abstract_state`, and a
  CheckpointError if the restored values differ from their checksums.
  """
  manifest = _read_manifest(manager, step)
  _check_layout(manager, step, manifest, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  _verify(restored['state'], manifest)
  return restored['state']


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores only the train state, without moving any data iterator; checked like `restore`."""
  manifest = _read_manifest(manager, step)
  _check_layout(manager, step, manifest, abstract_state)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))['state']
  _verify(state, manifest)
  return state


def restore_ema_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any):
  """Restores only the EMA parameters (sharded like `abstract_params`), checked like `restore`.

  A damaged checkpoint raises a CheckpointError naming it.
  """
  item = {'ema_params': abstract_params}
  try:
    manifest = _read_manifest(manager, step)
  except Exception as e:
    raise CheckpointError(_damaged(manager, step, e)) from e
  _check_layout(manager, step, manifest, item)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))['state']
    _verify(restored, manifest)
  except Exception as e:
    raise CheckpointError(_damaged(manager, step, e)) from e
  return restored['ema_params']


def _move_aside(manager: ocp.CheckpointManager, steps: list[int], workdir: str) -> None:
  """Moves unusable checkpoints to `workdir/CORRUPT_DIR`, so their steps can be saved again."""
  if jax.process_index() == 0:
    for step in steps:
      target = epath.Path(workdir) / CORRUPT_DIR / str(step)
      suffix = 0
      while (target if not suffix else target.with_name(f'{step}.{suffix}')).exists():
        suffix += 1
      target = target if not suffix else target.with_name(f'{step}.{suffix}')
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(_step_dir(manager, step)).rename(target)
      logging.warning('moved the unusable checkpoint of step %d to %s', step, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('flowception_jax: unusable checkpoints moved')
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator,
                   config: ml_collections.ConfigDict, workdir: str) -> tuple[int, Any] | None:
  """The newest usable checkpoint: `(step, train state)`, with `data_iterator` moved to it.

  Returns None if `workdir` has no checkpoint. A checkpoint that cannot be read or fails its
  checksums is reported with a warning naming it, and the previous one is tried; once one
  restores, the unusable newer ones are moved to `workdir/CORRUPT_DIR` (so their steps are saved
  afresh). A checkpoint of another architecture raises ValueError (`check_compatible`, or a
  CheckpointMismatchError when no checkpoint holds the arrays the code builds). If there are
  checkpoints but none is usable, raises a CheckpointError and changes nothing.
  """
  unusable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved_config = _restore_config(manager, step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      unusable.append((step, e))
    else:
      check_compatible(saved_config, config, workdir)
      try:
        state = restore(manager, step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-exception-caught
        unusable.append((step, e))
      else:
        _move_aside(manager, [s for s, _ in unusable], workdir)
        return step, state
    logging.warning('checkpoint %s is unusable (%s); trying the previous one',
                    _step_dir(manager, step), _reason(unusable[-1][1]))
  if unusable and all(isinstance(e, CheckpointMismatchError) for _, e in unusable):
    raise unusable[0][1]  # The code or config, not the files: the same for every checkpoint.
  if unusable:
    raise CheckpointError(
        f'no usable checkpoint in {manager.directory}: '
        + '; '.join(f'step {step}: {_reason(e)}' for step, e in unusable)
        + '. Nothing was changed. To start from scratch, move that directory away (or use a new '
        '--workdir)')
  return None
