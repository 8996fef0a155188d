"""The demo notebooks in `colabs/` run end to end, headless, on tiny settings, and ship clean.

Each notebook has one code cell tagged `parameters`; the test runs the notebook with a cell of
overrides inserted after it (the papermill convention), from the repository root, so the install
cell is skipped and this checkout's package is the one imported.
"""

import os

import nbclient
import nbformat
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COLABS = os.path.join(_ROOT, 'colabs')

# Every notebook in colabs/: (parameters for a run of seconds on CPU, images it must display).
NOTEBOOKS = {
    'quickstart.ipynb': (dict(CONFIG='configs/shapes.py:tiny', CPU_STEPS=4, NUM_VIDEOS=2,
                              OVERRIDES={'data.buckets': (12,)}), 3),
    'tasks.ipynb': (dict(CONFIG='configs/shapes.py:tiny', CPU_STEPS=4, NUM_VIDEOS=2,
                         OVERRIDES={'data.buckets': (12,)}), 4),
}


def _read(name):
  return nbformat.read(os.path.join(_COLABS, name), as_version=4)


def test_every_notebook_is_run_by_the_tests():
  assert sorted(f for f in os.listdir(_COLABS) if f.endswith('.ipynb')) == sorted(NOTEBOOKS)


@pytest.mark.parametrize('name', sorted(NOTEBOOKS))
def test_notebook_ships_without_outputs_and_with_one_parameter_cell(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  tagged = [cell for cell in code if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1


@pytest.mark.e2e
@pytest.mark.parametrize('name', sorted(NOTEBOOKS))
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
  parameters, num_images = NOTEBOOKS[name]
  notebook = _read(name)
  index = next(i for i, cell in enumerate(notebook.cells)
               if 'parameters' in cell.metadata.get('tags', []))
  overrides = dict(parameters, WORKDIR=str(tmp_path / 'workdir'))
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      '\n'.join(f'{key} = {value!r}' for key, value in overrides.items())))
  notebook.cells.append(nbformat.v4.new_code_cell(
      'import flowception_jax\nprint(flowception_jax.__file__)'))
  monkeypatch.setenv('PYTHONPATH', _ROOT)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': _ROOT}}).execute()

  images = [output for cell in notebook.cells for output in cell.get('outputs', [])
            if output.output_type == 'display_data'
            and any(kind.startswith('image/') for kind in output.data)]
  assert len(images) == num_images
  imported = notebook.cells[-1].outputs[0].text.strip()
  assert imported == os.path.join(_ROOT, 'flowception_jax', '__init__.py')
