"""The one writer of every file: whole or nothing, readable by others, local and on gs:// alike."""

import json
import os

import numpy as np
import pytest

from flowception_jax.storage import files


class _Interrupted(BaseException):
  """Stands for an interruption (KeyboardInterrupt, SystemExit) in the middle of a write."""


def _half_then(error):
  """A `write_with` callback that writes some bytes, then raises `error`."""
  def write(f):
    f.write(b'partial')
    raise error
  return write


def _arrays():
  rng = np.random.default_rng(0)
  return {'videos': rng.uniform(size=(2, 3, 4, 4, 3)).astype(np.float32),
          'lengths': np.array([3, 1], np.int32), 'half': np.arange(5, dtype=np.float16),
          'mask': np.array([True, False]), 'scalar': np.float64(2.5)}


def _check_round_trip(read, written):
  assert sorted(read) == sorted(written)
  for key, value in written.items():
    assert read[key].dtype == np.asarray(value).dtype and read[key].shape == np.shape(value), key
    np.testing.assert_array_equal(read[key], value, err_msg=key)


def test_paths_of_object_stores_stay_as_they_are(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.is_remote('gs://bucket/run') and files.is_remote('s3://bucket/x')
  assert not files.is_remote('run/x.npz') and not files.is_remote('/tmp/gs:/x')
  assert files.absolute('gs://bucket/run/eval.json') == 'gs://bucket/run/eval.json'
  assert files.absolute('run/eval.json') == os.path.join(str(tmp_path), 'run', 'eval.json')
  assert files.absolute('/abs/x') == '/abs/x'


def test_local_writes_create_folders_and_are_readable_by_others(tmp_path):
  path = tmp_path / 'a' / 'b' / 'out.json'
  old_umask = os.umask(0o077)  # A private umask: the mode is set, not inherited.
  try:
    files.write_json(str(path), {'x': [1, 2], 'y': 'z'})
  finally:
    os.umask(old_umask)
  assert json.loads(path.read_text()) == {'x': [1, 2], 'y': 'z'}
  assert path.read_text().endswith('\n')
  assert os.stat(path).st_mode & 0o777 == 0o644
  assert os.listdir(path.parent) == ['out.json']  # No temporary file left behind.
  assert files.exists(str(path)) and not files.exists(str(tmp_path / 'a' / 'other'))
  files.write_bytes(str(path), b'new')  # Replaced whole.
  assert files.read_bytes(str(path)) == b'new' and os.listdir(path.parent) == ['out.json']


@pytest.mark.parametrize('error', [OSError('disk full'), _Interrupted()])
def test_a_failed_local_write_leaves_nothing_new(tmp_path, error):
  fresh, kept = tmp_path / 'fresh.bin', tmp_path / 'kept.bin'
  kept.write_bytes(b'before')
  for path in (fresh, kept):
    with pytest.raises(type(error)):
      files.write_with(str(path), _half_then(error))
  assert not fresh.exists()
  assert kept.read_bytes() == b'before'
  assert sorted(os.listdir(tmp_path)) == ['kept.bin']  # No temporary file left behind.


def test_values_that_cannot_be_written_leave_nothing(tmp_path):
  path = tmp_path / 'out.json'
  with pytest.raises(TypeError, match='not JSON serializable'):
    files.write_json(str(path), {'x': object()})
  with pytest.raises(ValueError, match=r'must end in \.npz, got .*out\.np'):
    files.write_npz(str(tmp_path / 'out.np'), x=np.zeros(2))
  assert os.listdir(tmp_path) == []


def test_npz_round_trip_keeps_names_dtypes_and_shapes(tmp_path):
  path = str(tmp_path / 'sub' / 'arrays.npz')
  arrays = _arrays()
  files.write_npz(path, **arrays, listed=[1, 2, 3])
  with np.load(path) as direct:  # An ordinary .npz that NumPy reads.
    np.testing.assert_array_equal(direct['listed'], [1, 2, 3])
  _check_round_trip(files.read_npz(path), dict(arrays, listed=np.array([1, 2, 3])))
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_npz_of_pickled_objects_is_not_read(tmp_path):
  path = str(tmp_path / 'objects.npz')
  files.write_npz(path, ragged=np.array([np.zeros(2), np.zeros(3)], dtype=object))
  with pytest.raises(ValueError, match='allow_pickle'):
    files.read_npz(path)


def test_the_same_functions_write_whole_objects_in_a_bucket(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A path taken for a local one would make a 'gs:' folder here.
  arrays = _arrays()
  files.write_npz('gs://bucket/run/out/arrays.npz', **arrays)
  files.write_json('gs://bucket/run/out/eval.json', {'fvd': 1.5})
  files.write_bytes('gs://bucket/run/raw.bin', b'\x00\x01')
  _check_round_trip(files.read_npz('gs://bucket/run/out/arrays.npz'), arrays)
  assert json.loads(files.read_bytes('gs://bucket/run/out/eval.json')) == {'fvd': 1.5}
  assert files.read_bytes('gs://bucket/run/raw.bin') == b'\x00\x01'
  assert files.exists('gs://bucket/run/raw.bin') and not files.exists('gs://bucket/run/other')
  stored = {path: data for path, data in fake_gcs.objects.items() if not path.endswith('/')}
  assert sorted(stored) == ['gs://bucket/run/out/arrays.npz', 'gs://bucket/run/out/eval.json',
                            'gs://bucket/run/raw.bin']
  assert json.loads(stored['gs://bucket/run/out/eval.json']) == {'fvd': 1.5}
  assert os.listdir(tmp_path) == []


def test_a_failed_write_to_a_bucket_leaves_no_object(fake_gcs):
  files.write_bytes('gs://bucket/kept.bin', b'before')
  for path in ('gs://bucket/fresh.bin', 'gs://bucket/kept.bin'):
    with pytest.raises(OSError, match='disk full'):
      files.write_with(path, _half_then(OSError('disk full')))
  with pytest.raises(TypeError):
    files.write_json('gs://bucket/fresh.json', {'x': object()})
  assert {p: d for p, d in fake_gcs.objects.items() if not p.endswith('/')} == {
      'gs://bucket/kept.bin': b'before'}
