"""Every command the docs show runs as written, and every relative link in them resolves.

The commands come from the code blocks (fenced or indented) of README.md, RESULTS.md, BENCHMARKS.md and
docs/*.md, and from the inline code of their tables' cells: `cifar-jax ...`, `python -m cifar_jax.main ...`,
`python scripts/...` (`.venv/bin/...` variants and `bash scripts/*.sh` too) and `make ...`, after the
`VAR=value` prefixes and wrappers (`flock FILE`, `nice -n N`, `/usr/bin/time -v`, ...) before them; a shell
variable that the same document sets earlier (`FLAGS="..."`, then `cifar-jax $FLAGS`) is expanded. Without
training anything, each is checked as its parser would check it: the config file exists, every
`--config.FIELD=VALUE` names a field, the overridden config passes `config_lib.validate` (the check
`main.main` makes before anything compiles), `--mode` and the other flags are the command line's; a script's
subcommand and flags exist (read with `ast` from the script and the modules it imports from scripts/, so no
script is imported); a make target is the Makefile's. The links of every markdown file (README.md, RESULTS.md,
BENCHMARKS.md, docs/**) are resolved, headings' anchors included.
"""

import ast
import functools
import glob
import os
import re
import shlex
import sys

from absl import flags
import pytest

from cifar_jax import config_lib
from cifar_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RESULTS.md and BENCHMARKS.md give each measurement's command as it runs today (the script it ran under, when
# another, in a note beside it).
COMMAND_DOCS = ['README.md', 'RESULTS.md', 'BENCHMARKS.md'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(f'{ROOT}/docs/*.md'))
# Fenced blocks whose language is one of these hold commands (an empty language too).
SHELL_LANGUAGES = ('', 'sh', 'bash', 'shell', 'console')
# Words that run the command after them, with how many operands they take (`flock -s FILE cmd`, `taskset -c 1
# cmd`, `timeout 60 cmd`), and their options that take a value (`nice -n 5`).
WRAPPERS = {'flock': 1, 'taskset': 1, 'timeout': 1, 'nice': 0, 'env': 0, 'time': 0, 'do': 0, 'then': 0,
            'exec': 0, 'nohup': 0, 'srun': 0}
WRAPPER_OPTIONS_WITH_VALUES = {'nice': ('-n',), 'timeout': ('-s', '-k'), 'flock': ('-w', '-E')}
# srun's options are `--name=value` or take the next word, except these.
SRUN_OPTIONS_WITHOUT_VALUES = ('--unbuffered', '-u', '--label', '-l', '--exclusive', '--overlap', '--pty')
SHELL_OPERATORS = (';', '&', '&&', '|', '||', '(', ')')
# Flags every absl program has; argparse's help.
ABSL_FLAGS = {'--help', '--helpshort', '--helpfull', '--helpxml', '--flagfile', '--logtostderr',
              '--alsologtostderr', '--verbosity', '-v', '--log_dir', '--undefok', '--only_check_args'}
ARGPARSE_FLAGS = {'-h', '--help'}
DEFAULT_CONFIG = 'configs/default.py'


# Commands: extraction ------------------------------------------------------------------------------------


def code_blocks(text: str):
  """(language, first line number, lines) of each code block of a markdown text: fenced ones with their
  language, indented ones (4 spaces, after a blank line, not inside a list item) with ''."""
  lines = text.split('\n')
  i = 0
  while i < len(lines):
    m = re.match(r'^\s*(```|~~~)\s*([\w+-]*)', lines[i])
    if not m:
      if _starts_indented_block(lines, i):
        start, body = i + 1, []
        while i < len(lines) and (_indented(lines[i]) or not lines[i].strip() and i + 1 < len(lines) and
                                  _indented(lines[i + 1])):
          body.append(lines[i][4:] if lines[i].startswith('    ') else lines[i].lstrip('\t'))
          i += 1
        yield '', start, body
        continue
      i += 1
      continue
    fence, language, start = m.group(1), m.group(2).lower(), i + 1
    i += 1
    body = []
    while i < len(lines) and not lines[i].strip().startswith(fence):
      body.append(lines[i])
      i += 1
    i += 1
    yield language, start + 1, body


def _indented(line: str) -> bool:
  return bool(line.strip()) and (line.startswith('    ') or line.startswith('\t'))


def _starts_indented_block(lines, i: int) -> bool:
  """Whether lines[i] opens an indented code block: indented, after a blank line (or at the start), and the
  text before that blank line is neither a list item nor indented (a list item's continuation)."""
  if not _indented(lines[i]) or i > 0 and lines[i - 1].strip():
    return False
  before = next((line for line in reversed(lines[:i]) if line.strip()), '')
  return not before[:1].isspace() and not re.match(r'^([-*+]|\d+[.)])\s', before)


def shell_commands(text: str):
  """(line number, argv) of every simple command in the shell blocks of a markdown text: continuation
  lines joined, comments dropped, `;`, `&&`, `|` and `&` split, `VAR=value` prefixes and wrappers
  (`flock`, `taskset`, `do`, ...) removed, and `$VAR` (a word of its own) replaced by the words of the value
  that a line `VAR=value` of an earlier shell block, or earlier in the same block, gave it."""
  variables = {}
  for language, start, body in code_blocks(text):
    if language not in SHELL_LANGUAGES:
      continue
    logical, first = '', None
    for offset, line in enumerate(body):
      first = start + offset if first is None else first
      if line.rstrip().endswith('\\'):
        logical += line.rstrip()[:-1] + ' '
        continue
      logical += line
      yield from _simple_commands(first, logical, variables)
      logical, first = '', None
    if logical:
      yield from _simple_commands(first, logical, variables)


def _simple_commands(line_number: int, logical_line: str, variables: dict):
  lexer = shlex.shlex(logical_line, posix=True, punctuation_chars=';&|()')
  lexer.whitespace_split = True
  lexer.commenters = '#'
  tokens = list(lexer)
  command = []
  for token in tokens + [';']:
    if token in SHELL_OPERATORS or set(token) <= set(';&|()'):
      if command and all(re.match(r'^[A-Za-z_]\w*=', t) for t in command):  # `FLAGS="..."` alone
        variables.update(t.split('=', 1) for t in command)
      elif command:
        yield line_number, _unwrap(command)
      command = []
    else:
      m = re.match(r'^\$(?:([A-Za-z_]\w*)|\{([A-Za-z_]\w*)\})$', token)
      name = m and (m.group(1) or m.group(2))
      command.extend(shlex.split(variables[name]) if name in variables else [token])


def _unwrap(argv):
  """argv without leading `VAR=value` assignments and wrapper commands (with their own arguments)."""
  argv = list(argv)
  while argv:
    if re.match(r'^[A-Za-z_]\w*=', argv[0]):
      argv.pop(0)
    elif os.path.basename(argv[0]) in WRAPPERS:
      wrapper = os.path.basename(argv.pop(0))
      operands = WRAPPERS[wrapper]
      while argv and argv[0].startswith('-'):
        option = argv.pop(0)
        takes_value = (option in WRAPPER_OPTIONS_WITH_VALUES.get(wrapper, ()) or
                       wrapper == 'srun' and '=' not in option and option not in SRUN_OPTIONS_WITHOUT_VALUES)
        if takes_value and argv:
          argv.pop(0)
      del argv[:operands]
    else:
      break
  return argv


def classify(argv):
  """('cifar-jax', args) / ('script', path, args) / ('make', args), or None for other commands."""
  if not argv:
    return None
  word, base = argv[0], os.path.basename(argv[0])
  if base == 'cifar-jax':
    return ('cifar-jax', argv[1:])
  if re.match(r'^python[\d.]*$', base):
    args = argv[1:]
    if args[:2] == ['-m', 'cifar_jax.main']:
      return ('cifar-jax', args[2:])
    if args and args[0].startswith('scripts/'):
      return ('script', args[0], args[1:])
    return None
  if base in ('bash', 'sh') and len(argv) > 1 and argv[1].startswith('scripts/'):
    return ('script', argv[1], argv[2:])
  if word.startswith('scripts/'):
    return ('script', word, argv[1:])
  if base == 'make':
    return ('make', argv[1:])
  return None


def table_commands(text: str):
  """(line number, argv) of the commands written as inline code in a table's cells (the experiments
  table's `cifar-jax --config=... --workdir=...`)."""
  outside = re.sub(r'^\s*(```|~~~).*?^\s*\1', lambda m: '\n' * m.group(0).count('\n'), text,
                   flags=re.M | re.S)
  for number, line in enumerate(outside.split('\n'), start=1):
    if line.lstrip().startswith('|'):
      for span in re.findall(r'`([^`]+)`', line):
        try:
          argv = _unwrap(shlex.split(span))
        except ValueError:
          continue
        if len(argv) > 1 and re.match(r'^(cifar-jax|python[\d.]*|\.venv/bin/\S+|make|bash)$', argv[0]):
          yield number, argv


def documented_commands():
  """(file:line, classified command) of every command the docs show."""
  found = []
  for doc in COMMAND_DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      text = f.read()
    for line_number, argv in list(shell_commands(text)) + list(table_commands(text)):
      command = classify(argv)
      if command is not None:
        found.append((f'{doc}:{line_number}', command))
  return found


# Commands: checks ----------------------------------------------------------------------------------------


class DocError(Exception):
  """A documented command that would not run as written."""


def check_cifar_jax(args):
  """Parses `cifar-jax ARGS` as `main.parse_flags` does and validates the overridden config."""
  argv = ['cifar-jax'] + list(args)
  config_arg = main._flag_value(argv, 'config')  # pylint: disable=protected-access
  if not config_arg:
    raise DocError('no --config=FILE')
  path = config_arg.split(':', 1)[0]
  if '$' in path:  # a loop over configs (`--config=configs/$name.py`): the shell picks the file
    return
  if not os.path.isfile(os.path.join(ROOT, path)):
    raise DocError(f'--config={config_arg}: no such file')
  # A value that the shell fills in ($DT, $id) can only have its field name checked.
  shell_values = [a for a in argv[1:] if '$' in a]
  names = [m.group(1) for m in (re.match(r'-{1,2}(?:no)?config\.([^=\[]+)', a) for a in shell_values) if m]
  argv = [a for a in argv if a not in shell_values]
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  if not main._flag_value(argv, 'workdir'):  # pylint: disable=protected-access
    argv.append('--workdir=x')
  cwd, sys_argv = os.getcwd(), sys.argv
  os.chdir(ROOT)
  sys.argv = argv  # config_flags reads the overrides from sys.argv
  try:
    config = main._check_command_line(argv)  # pylint: disable=protected-access
    config_lib.check_field_names(names, config)
    flag_values(argv)
    config = flag_values.config
    if config.get('data') and config.data.get('corruptions_path'):
      # The released CIFAR-10-C files are the reader's, not this machine's: the folder's existence is theirs.
      with config.unlocked():
        config.data.corruptions_path = ROOT
        config.data.validation_size = 0
    config_lib.validate(config)
  except (main.ConfigError, flags.Error) as e:
    raise DocError(str(e)) from e
  finally:
    os.chdir(cwd)
    sys.argv = sys_argv


@functools.lru_cache(maxsize=None)
def _module_tree(path: str):
  """(parsed module, [paths of the modules it imports from scripts/]) of a Python file."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  scripts_dir = os.path.join(ROOT, 'scripts')
  imported = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    for name in names:
      parts = name.split('.')
      if parts[0] == 'scripts':
        parts = parts[1:]
      for base in (os.path.dirname(path), scripts_dir):
        candidate = os.path.join(base, *parts)
        for file in (candidate + '.py', os.path.join(candidate, '__init__.py')):
          if parts and os.path.isfile(file) and os.path.realpath(file).startswith(scripts_dir):
            imported.append(os.path.realpath(file))
  return tree, sorted(set(imported))


def _closure(paths, stop=()):
  seen, todo = [], list(paths)
  while todo:
    path = todo.pop()
    if path in seen:
      continue
    seen.append(path)
    todo.extend(p for p in _module_tree(path)[1] if p not in stop)
  return seen


def _options(path: str, absl: bool = True):
  """The option strings a Python module defines: argparse's `add_argument('--x', '-x')`, absl's
  `DEFINE_*('x')` (and `--nox` for booleans), config_flags' `--config` (then `--config.FIELD`). With
  `absl=False` only argparse's: absl flags that an argparse program imports are never parsed."""
  options, config_flags_names = set(), set()
  for node in ast.walk(_module_tree(path)[0]):
    if not isinstance(node, ast.Call):
      continue
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, 'id', '')
    literals = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    literals += [k.value.value for k in node.keywords
                 if k.arg == 'name' and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)]
    if func == 'add_argument':
      options.update(a for a in literals if a.startswith('-'))
    elif absl and func.startswith('DEFINE') and literals:
      options.add('--' + literals[0])
      if func in ('DEFINE_bool', 'DEFINE_boolean'):
        options.add('--no' + literals[0])
      if func == 'DEFINE_config_file':
        config_flags_names.add(literals[0])
  return options, config_flags_names


def _uses_argparse(path: str) -> bool:
  """Whether a script parses its command line with argparse (then only argparse's options count)."""
  tree = _module_tree(path)[0]
  return any(isinstance(n, ast.Attribute) and n.attr == 'ArgumentParser' for n in ast.walk(tree))


def _subcommands(path: str):
  """{subcommand: module path or None}: `add_parser('x')` literals, and the dict literals that pick a
  module by name (`FAMILIES = {'step': step, ...}`)."""
  tree, imported = _module_tree(path)
  found = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_parser' and node.args:
      if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        found.setdefault(node.args[0].value, None)
  uses_subparsers = any(isinstance(n, ast.Attribute) and n.attr == 'add_subparsers' for n in ast.walk(tree))
  if uses_subparsers:
    by_name = {os.path.splitext(os.path.basename(p))[0]: p for p in imported}
    for node in ast.walk(tree):
      if isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) for k in node.keys):
        if all(isinstance(v, ast.Name) and v.id in by_name for v in node.values):
          found.update({k.value: by_name[v.id] for k, v in zip(node.keys, node.values)})
  return found


def _shell_options(path: str):
  """The options a bash script's `case` patterns accept (`--out=*)`, `--smoke)`)."""
  with open(path) as f:
    text = f.read()
  options = set()
  for pattern in re.findall(r'^\s*(-[^\s)]*)\)', text, re.M):
    options.update(p.split('=')[0] for p in pattern.split('|'))
  return options


def check_script(script: str, args):
  """A script's subcommand and flags exist; its `--config` overrides pass like cifar-jax's."""
  path = os.path.join(ROOT, script)
  if not os.path.isfile(path):
    raise DocError(f'{script}: no such script')
  if path.endswith('.sh'):
    known, config_names = _shell_options(path) | {'-h', '--help'}, set()
  else:
    subcommands = _subcommands(path)
    family_modules = {p for p in subcommands.values() if p}
    modules = _closure([os.path.realpath(path)], stop=family_modules)
    if subcommands:
      if not args or args[0].startswith('-'):
        if not set(args) & ARGPARSE_FLAGS:
          raise DocError(f'{script} needs a subcommand: {sorted(subcommands)}')
      else:
        if args[0] not in subcommands:
          raise DocError(f'{script} {args[0]}: no such subcommand; it has {sorted(subcommands)}')
        if subcommands[args[0]]:
          modules += _closure([subcommands[args[0]]])
        args = args[1:]
    known, config_names = set(ARGPARSE_FLAGS | ABSL_FLAGS), set()
    argparse_entry = _uses_argparse(path)
    for module in modules:
      options, configs = _options(module, absl=not argparse_entry or module == os.path.realpath(path))
      known |= options
      config_names |= configs
  own = []
  for arg in args:
    if not arg.startswith('-') or arg == '-':
      continue
    name = arg.split('=', 1)[0]
    if any(name.startswith(f'--{c}.') or name.startswith(f'--no{c}.') for c in config_names):
      continue
    if name not in known:
      raise DocError(f'{script}: no flag {name}; it has {sorted(known - ABSL_FLAGS)}')
    own.append(name[2:])
  if 'config' in config_names and any(a.startswith('--config=') for a in args):  # the trainer's config flag
    check_cifar_jax([a for a in args if re.match(r'-{1,2}(no)?config(=|\.)', a)])
  _check_overrides_of_sweep(args, known)


def _check_overrides_of_sweep(args, known):
  """sweep.py's `--set=FIELD=VALUE` names a field of the default config; `--configs` files exist."""
  if '--set' not in known:
    return
  config = main._load_config(os.path.join(ROOT, DEFAULT_CONFIG))  # pylint: disable=protected-access
  sets = [a.split('=', 1)[1] for a in args if a.startswith('--set=')]
  try:
    config_lib.check_field_names([s.split('=', 1)[0] for s in sets], config, flag='--set')
  except main.ConfigError as e:
    raise DocError(str(e)) from e
  for arg in args:
    if arg.startswith('--configs='):
      for file in arg.split('=', 1)[1].split(','):
        if file and not os.path.isfile(os.path.join(ROOT, file)):
          raise DocError(f'--configs: {file}: no such file')


def _make_targets():
  with open(os.path.join(ROOT, 'Makefile')) as f:
    return set(re.findall(r'^([A-Za-z][\w.-]*)\s*:(?!=)', f.read(), re.M))


def check_make(args):
  """Every target is the Makefile's; `make train CONFIG=... ARGS="..."` passes as cifar-jax would."""
  variables = dict(a.split('=', 1) for a in args if '=' in a and not a.startswith('-'))
  targets = [a for a in args if '=' not in a and not a.startswith('-')]
  unknown = [t for t in targets if t not in _make_targets()]
  if unknown:
    raise DocError(f'make: no target {unknown}; the Makefile has {sorted(_make_targets())}')
  if 'train' in targets:
    check_cifar_jax([f"--config={variables.get('CONFIG', DEFAULT_CONFIG)}",
                     f"--workdir={variables.get('WORKDIR', 'runs/default')}"]
                    + shlex.split(variables.get('ARGS', '')))


def check_command(command):
  kind = command[0]
  if kind == 'cifar-jax':
    check_cifar_jax(command[1])
  elif kind == 'script':
    check_script(command[1], command[2])
  else:
    check_make(command[1])


COMMANDS = documented_commands()


def test_the_docs_show_commands():
  kinds = {c[0] for _, c in COMMANDS}
  assert {'cifar-jax', 'script', 'make'} <= kinds, kinds
  docs = {where.rsplit(':', 1)[0] for where, _ in COMMANDS}
  assert {'README.md', 'RESULTS.md', 'BENCHMARKS.md'} <= docs, docs


@pytest.mark.parametrize('where,command', COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command(where, command):
  try:
    check_command(command)
  except DocError as e:
    pytest.fail(f'{where}: {e}', pytrace=False)


@pytest.mark.parametrize('command,message', [
    ('cifar-jax --config=configs/default.py --workdir=w --config.optimizer.lrr=0.1', 'optimizer.lr'),
    ('cifar-jax --config=configs/default.py --workdir=w --config.optimizer.lr=-1', 'optimizer.lr must'),
    ('cifar-jax --config=configs/nothing.py --workdir=w', 'no such file'),
    ('cifar-jax --config=configs/default.py --workdir=w --mode=train_more', 'mode'),
    ('cifar-jax --config=configs/default.py --workdir=w --epochs=3', 'epochs'),
    ('python scripts/compare_frameworks.py --config=configs/one_cycle.py --seedz=2', 'no flag --seedz'),
    ('python scripts/sweep.py --set=model.widht=0.25', 'model.widht'),
    ('make tests', 'no target'),
    ('python scripts/benchmark.py --width=1', 'needs a subcommand'),
    ('python scripts/benchmark.py seeds --roundz=3', 'no flag --roundz'),
    ('python scripts/benchmark.py profile --mode=onednn --channel_last', 'no flag --channel_last'),
    # sweep.py's absl flags are imported by the seeds subcommand, never parsed by its argparse:
    ('python scripts/benchmark.py seeds --executor=local', 'no flag --executor'),
    ('python scripts/bench_seeds.py --seeds=1,2,4', 'no such script'),
    ('python scripts/plot.py calibrate runs/x', 'no such subcommand'),
    ('make train ARGS="--config.num_epoch=5"', 'num_epoch'),
])
def test_the_check_finds_mistakes(command, message):
  """What each documented command goes through fails on a misspelt field, an unknown flag or target."""
  (_, argv), = list(shell_commands(f'```sh\n{command}\n```'))
  with pytest.raises(DocError, match=re.escape(message)):
    check_command(classify(argv))


def test_commands_are_read_as_the_shell_reads_them():
  text = ('```sh\nJAX_PLATFORMS=cpu flock -s /tmp/l .venv/bin/python scripts/sweep.py --seeds=3 \\\n'
          '  --workdir=runs/x   # a comment\nfor id in 0 1; do\n  cifar-jax --config=c.py --a=$id &\n'
          'done; wait\nmake test   # the tests\nsrun --gpus=1 -n 2 --unbuffered cifar-jax --config=d.py\n'
          '```\n```python\ncifar-jax --not=a_command\n```\n')
  commands = [argv for _, argv in shell_commands(text)]
  assert ['.venv/bin/python', 'scripts/sweep.py', '--seeds=3', '--workdir=runs/x'] in commands
  assert ['cifar-jax', '--config=c.py', '--a=$id'] in commands
  assert ['make', 'test'] in commands
  assert ['cifar-jax', '--config=d.py'] in commands
  assert not any('--not=a_command' in argv for argv in commands)


def test_shell_variables_indented_blocks_and_table_cells():
  """`$FLAGS` takes the words an earlier `FLAGS=...` line of the document gave it (an unknown one stays as it
  is); an indented block holds commands unless it continues a list item; a table cell's command may start
  with `VAR=value` and wrappers."""
  text = ('Before:\n\n    JAX_PLATFORMS=cpu /usr/bin/time -v python scripts/benchmark.py seeds --rounds=3\n\n'
          '```sh\nFLAGS="--config=configs/default.py \\\n  --workdir=w"\n'
          'cifar-jax $FLAGS --mode=evaluate\n```\n'
          'Text.\n\n```sh\nnice -n 5 cifar-jax ${FLAGS} --config.num_epochs=1 $UNSET\n```\n'
          '- a list item\n\n    python scripts/not_code.py\n')
  commands = [argv for _, argv in shell_commands(text)]
  flags = ['--config=configs/default.py', '--workdir=w']
  assert commands == [['python', 'scripts/benchmark.py', 'seeds', '--rounds=3'],
                      ['cifar-jax', *flags, '--mode=evaluate'],
                      ['cifar-jax', *flags, '--config.num_epochs=1', '$UNSET']]
  table = ('| a | b |\n| --- | --- |\n'
           '| `JAX_PLATFORMS=cpu .venv/bin/python scripts/benchmark.py step --width=1` '
           '| `GPU_CHECK_SMOKE=1 bash scripts/gpu/gpu_check.sh --smoke`, `GPU_CHECK_SMOKE=1`, '
           '`scripts/x.py` |\n')
  assert [argv for _, argv in table_commands(table)] == [
      ['.venv/bin/python', 'scripts/benchmark.py', 'step', '--width=1'],
      ['bash', 'scripts/gpu/gpu_check.sh', '--smoke']]


# Links ---------------------------------------------------------------------------------------------------


def markdown_files():
  files = glob.glob(f'{ROOT}/*.md') + glob.glob(f'{ROOT}/docs/**/*.md', recursive=True)
  return sorted(os.path.relpath(f, ROOT) for f in files)


def _without_code(text: str) -> str:
  text = re.sub(r'^\s*(```|~~~).*?^\s*\1', '', text, flags=re.M | re.S)
  return re.sub(r'`[^`\n]*`', '', text)


def anchors(path: str):
  """GitHub's anchors of a markdown file's headings (lower case, punctuation dropped, spaces -> '-')."""
  with open(path) as f:
    text = re.sub(r'^\s*(```|~~~).*?^\s*\1', '', f.read(), flags=re.M | re.S)
  found, counts = set(), {}
  for heading in re.findall(r'^#{1,6}\s+(.*?)\s*#*\s*$', text, re.M):
    slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
    n = counts.get(slug, 0)
    counts[slug] = n + 1
    found.add(slug if n == 0 else f'{slug}-{n}')
  return found


def links(text: str):
  """The targets of inline links and images, and of reference definitions."""
  text = _without_code(text)
  targets = re.findall(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', text)
  targets += re.findall(r'^\s*\[[^\]]+\]:\s*(\S+)', text, re.M)
  return targets


def broken_links(doc: str):
  with open(os.path.join(ROOT, doc)) as f:
    text = f.read()
  broken = []
  for target in links(text):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(
        ROOT, doc)
    if not os.path.exists(resolved):
      broken.append(f'{target} (no {os.path.relpath(resolved, ROOT)})')
    elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
      broken.append(f'{target} (no heading #{anchor} in {os.path.relpath(resolved, ROOT)})')
  return broken


@pytest.mark.parametrize('doc', markdown_files())
def test_links_resolve(doc):
  broken = broken_links(doc)
  assert not broken, f'{doc}: broken links: {broken}'


def test_the_link_check_finds_broken_links(tmp_path, monkeypatch):
  monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
  (tmp_path / 'a.md').write_text('# A title, here\n[ok](a.md#a-title-here) [bad](b.md) ![img](x.png) '
                                 '[anchor](a.md#nothing) `[code](no.md)`\n')
  assert broken_links('a.md') == ['b.md (no b.md)', 'x.png (no x.png)',
                                  'a.md#nothing (no heading #nothing in a.md)']
