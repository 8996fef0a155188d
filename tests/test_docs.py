"""The commands of README.md and docs/*.md: every module exists and takes every flag shown.

Each `python -m flowception_jax...` command, in a fenced block (a backslash or an open quote
continues it on the next line) or inline in backticks, also as the job a launcher runs
(`launch/tpu_vm.sh run -- python -m ...`), is checked: its module exists; each
`--flag` is one the command defines, with a value of its type (enum choices included); relative
paths (from the repository root) exist; `--config=configs/X.py[:variant]` loads and its
`--config.a.b=v` overrides parse as the command parses them; a study's `--variant`s override
fields of that config. A command's flags are those it reports with `--helpxml`, which runs its
`__main__` block up to the parsing of the flags (flags defined at import, in `_define_flags()`, by
`jax.config.config_with_absl()`, ...): one process per module, forked from one that has imported
the library once. The short commands of the fenced blocks (no training, no sampling) are run as
written, forked from the same process.
"""

import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from absl import flags
from ml_collections import config_flags
import pytest

from flowception_jax.research import study

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = ['README.md'] + sorted(glob.glob('docs/*.md', root_dir=_ROOT))
_SHORT = ('flowception_jax.research.memory_estimate',)  # Seconds on a CPU, no devices.
_SEPARATORS = ('&&', '||', '|', ';')


def _commands_in(text: str) -> list[list[str]]:
  """The `python -m flowception_jax...` commands of shell `text`, as words (comments dropped).

  Commands are split at `&&`, `||`, `|` and `;`; in the synopsis of optional flags,
  `[--a | --b] [--c]`, the brackets and the `|` between alternatives are dropped. A launcher's
  command (`launch/X.sh ... -- JOB`) counts as its JOB.
  """
  commands, words, depth = [[]], [], 0
  for word in shlex.split(text, comments=True):
    if word.startswith('['):
      depth, word = depth + 1, word[1:]
    closes = depth > 0 and word.endswith(']')
    word = word[:-1] if closes else word
    if word in _SEPARATORS and not (depth and word == '|'):
      commands.append(words)
      words = []
    elif word and word != '|':
      words.append(word)
    depth -= closes
  commands = [c[c.index('--') + 1:] if c[:1] and c[0].startswith('launch/') and '--' in c else c
              for c in commands + [words]]
  return [c for c in commands
          if c[:2] == ['python', '-m'] and c[2:3] and c[2].startswith('flowception_jax')]


def _doc_commands() -> list[tuple[str, bool, list[str]]]:
  """(where: 'file:line', whether in a fenced block, words) of every command in the docs."""
  found = []
  for path in _DOCS:
    with open(os.path.join(_ROOT, path)) as f:
      lines = f.read().splitlines()
    fenced, i = False, 0
    while i < len(lines):
      line, where = lines[i], f'{path}:{i + 1}'
      if line.lstrip().startswith('```'):
        fenced = not fenced
      elif fenced:
        while i + 1 < len(lines):  # The command goes on after a backslash or in an open quote.
          if line.endswith('\\'):
            i += 1
            line = f'{line[:-1]} {lines[i].strip()}'
            continue
          try:
            shlex.split(line, comments=True)
            break
          except ValueError:  # No closing quotation.
            i += 1
            line = f'{line}\n{lines[i]}'
        found += [(where, True, words) for words in _commands_in(line)]
      else:
        for span in re.findall(r'`([^`]+)`', line):
          found += [(where, False, words) for words in _commands_in(span)]
      i += 1
  return found


COMMANDS = _doc_commands()


def test_the_docs_show_the_commands():
  """The reading of the docs finds what they hold: every command line, fenced and inline."""
  assert len(COMMANDS) >= 50, COMMANDS
  shown = {words[2] for _, _, words in COMMANDS}
  assert {'flowception_jax.main', 'flowception_jax.sample', 'flowception_jax.evaluate',
          'flowception_jax.prepare', 'flowception_jax.fvd',
          'flowception_jax.research.memory_estimate'} <= shown
  assert any(not fenced for _, fenced, _ in COMMANDS)
  # A synopsis of optional flags, and a quoted value over two lines, are read whole.
  prepare = next(w for _, _, w in COMMANDS
                 if w[2] == 'flowception_jax.prepare' and '--labels=labels.csv' in w)
  assert {'--label_from_dir', '--fps=16', '--num_workers=8'} <= set(prepare)
  assert any('\n' in word for _, _, words in COMMANDS for word in words)
  # The jobs of the launchers' command lines, e.g. on several TPU slices.
  assert any('--config.mesh.dcn_data=2' in words and 'gs://' in ' '.join(words)
             for _, _, words in COMMANDS)


# Runs each job `[MODULE, ARG...]` of a JSON list as `python -m MODULE ARG...`, its output and
# errors to files, each in a child forked after the imports the commands share, which then cost one
# process rather than each; prints the JSON list of the exit codes.
_RUN_FORKED = """
import json, os, runpy, sys, traceback
import flowception_jax.core.inference, flowception_jax.datasets, flowception_jax.training.train
codes = []
for argv, out, err in json.loads(sys.argv[1]):
  pid = os.fork()
  if not pid:
    for fd, path in ((1, out), (2, err)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv, code = argv, 0
    try:
      runpy.run_module(argv[0], run_name='__main__', alter_sys=True)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""

_RUN = [(where, words) for where, fenced, words in COMMANDS if fenced and words[2] in _SHORT]


@pytest.fixture(scope='module')
def command_runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
  """(exit code, output, errors) of `python -m MODULE --helpxml` for each module of the docs
  (key: the module) and of each short command (key: where it is shown)."""
  modules = sorted({words[2] for _, _, words in COMMANDS if importlib.util.find_spec(words[2])})
  jobs = [(module, [module, '--helpxml']) for module in modules]
  jobs += [(where, words[2:]) for where, words in _RUN]
  folder = tmp_path_factory.mktemp('commands')
  files = [(folder / f'{i}.out', folder / f'{i}.err') for i in range(len(jobs))]
  result = subprocess.run(
      [sys.executable, '-c', _RUN_FORKED,
       json.dumps([(argv, *map(str, paths)) for (_, argv), paths in zip(jobs, files)])],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  codes = json.loads(result.stdout.splitlines()[-1])
  return {key: (code, out.read_text(), err.read_text())
          for (key, _), code, (out, err) in zip(jobs, codes, files)}


def _parse_helpxml(module: str, text: str, stderr: str) -> dict[str, dict]:
  """The flags of `module`'s `--helpxml` output: name -> {'type': ..., 'choices': [...]}."""
  assert '<AllFlags>' in text, f'python -m {module} --helpxml printed no flags:\n{stderr[-3000:]}'
  return {flag.findtext('name'): {'type': flag.findtext('type'),
                                  'choices': [e.text for e in flag.iter('enum_value')]}
          for flag in ElementTree.fromstring(text).iter('flag')}


@pytest.fixture(scope='module')
def command_flags(command_runs) -> dict[str, dict[str, dict]]:
  """The flags every command of the docs takes."""
  modules = {words[2] for _, _, words in COMMANDS if importlib.util.find_spec(words[2])}
  return {module: _parse_helpxml(module, *command_runs[module][1:]) for module in modules}


def _check_value(where: str, name: str, value: str | None, flag: dict) -> None:
  kind = flag['type']
  if kind == 'bool':
    assert value is None or value.lower() in ('true', 'false', '1', '0'), (where, name, value)
    return
  assert value is not None, f'{where}: --{name} needs a value'
  if kind == 'int':
    int(value, 0)
  elif kind == 'float':
    float(value)
  elif flag['choices']:
    assert value in flag['choices'], f'{where}: --{name}={value} is none of {flag["choices"]}'


def _parsed_config(config_args: list[str]):
  """The config of `--config=...` and its `--config.*` overrides, parsed as a command does."""
  argv = ['docs', *config_args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'The config.', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.xdist_group('docs')  # One worker asks each command for its flags, once.
@pytest.mark.parametrize('where, fenced, words', COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_command_takes_the_flags_shown(where, fenced, words, command_flags, monkeypatch):
  del fenced
  module, args = words[2], words[3:]
  assert importlib.util.find_spec(module), f'{where}: no module {module}'
  defined = command_flags[module]
  config_args, variants = [], []
  for arg in args:
    assert arg.startswith('--'), f'{where}: {arg!r} is not a flag'
    name, has_value, value = arg[2:].partition('=')
    value = value if has_value else None
    if name.startswith('config.'):  # An override of a config field: parsed with the config.
      config_args.append(arg)
      continue
    if name not in defined and name.startswith('no') and value is None:
      name = name[2:]  # --noflag: a boolean set false.
      assert defined.get(name, {}).get('type') == 'bool', f'{where}: {module} has no --no{name}'
      continue
    assert name in defined, f'{where}: {module} has no flag --{name}'
    if name == 'config':
      config_args.append(arg)
      value = value.split(':')[0]
    elif name == 'variant' and module == 'flowception_jax.research.study':
      variants.append(value)
    _check_value(where, name, value, defined[name])
    if value and not value.startswith('/') and '/' in value and '://' not in value:
      assert os.path.exists(os.path.join(_ROOT, value)), f'{where}: no {value} in the repository'
  assert not config_args or 'config' in defined, f'{where}: {module} takes no --config'
  if any(a.startswith('--config=') for a in config_args):
    monkeypatch.chdir(_ROOT)  # Config paths are relative to the repository root.
    config = _parsed_config(config_args)
    for text in variants:
      study.apply_overrides(config, study.parse_variant(text))
  else:
    assert not config_args and not variants, f'{where}: overrides without --config'


@pytest.mark.xdist_group('docs')  # With the flags' worker, which runs them in the same process.
@pytest.mark.parametrize('where, words', _RUN, ids=[w for w, _ in _RUN])
def test_short_commands_run_as_written(where, words, command_runs):
  del words  # The fixture ran them.
  code, out, err = command_runs[where]
  assert code == 0, f'{where}:\n{err[-3000:]}'
  assert out.strip(), where
