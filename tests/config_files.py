"""Loads `configs/<name>.py` as `--config=configs/<name>.py:<variant>` does, for tests."""

import importlib.util
import os

import ml_collections

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)
