"""Checkpoints of the train state, the input-pipeline position and the config, with Orbax.

Each checkpoint is an Orbax composite of three items: `state` (the train state pytree), `data` (the
Grain iterator state, so a resumed run reads exactly the batches an uninterrupted one would) and
`config` (the resolved config, so sampling and resumption know what the weights are). Orbax writes
to a temporary directory and renames it when complete: a killed save leaves no half checkpoint.
"""

from collections.abc import Mapping
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from flowception_jax import config as config_lib

# Config fields that determine the shapes of the parameters or the meaning of the weights.
_ARCHITECTURE_FIELDS = ('method', 'data.name', 'data.image_size', 'model.size', 'model.patch_size',
                        'model.mlp_ratio', 'model.attn_window')


def make_manager(workdir: str, *, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
  root = workdir if '://' in workdir else os.path.abspath(workdir)  # gs://... stays as it is.
  return ocp.CheckpointManager(os.path.join(root, 'checkpoints'),
                               options=options, item_names=('state', 'data', 'config'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator, config) -> None:
  """Starts an asynchronous save; call `manager.wait_until_finished()` before reading it."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config.to_dict())))


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """`saved` plus the fields it lacks, taken from `defaults` (nested dicts merged)."""
  merged = dict(saved)
  for key, value in defaults.items():
    if key not in merged:
      merged[key] = value
    elif isinstance(value, dict) and isinstance(merged[key], dict):
      merged[key] = _with_defaults(merged[key], value)
  return merged


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config saved at `step`; fields added to `base_config` since then take their defaults."""
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(
      _with_defaults(restored['config'], config_lib.base_config().to_dict()))


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
  """Restores the train state (sharded like `abstract_state`) and moves `data_iterator` in place."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored['state']


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores only the train state, without moving any data iterator."""
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))['state']


def restore_ema_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any):
  """Restores only the EMA parameters (sharded like `abstract_params`), reading nothing else."""
  item = {'ema_params': abstract_params}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))
  return restored['state']['ema_params']
