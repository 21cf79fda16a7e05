"""The package's import graph (read from the source with ast): no cycle, and no import inside a function
except of the optional dependencies (docs/architecture.md)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cifar_jax')
# Imported where they are used, so that a run without them (or without needing them) does not pay for them.
# matplotlib: only the LR range test plots (lr_find.plot); a training run does not import it.
# cifar_jax.torch_models: the torch twin's models, which import torch (torch_reference imports them).
# cv2, scipy (scipy.ndimage), skimage: only the CIFAR-10-C corruptions (cifar_jax/corruptions.py) use them.
OPTIONAL = ('torch', 'tensorflow_datasets', 'tensorboardX', 'matplotlib', 'cifar_jax.torch_models', 'cv2',
            'scipy', 'skimage')


def _modules() -> dict[str, ast.Module]:
  """Every module of the package by its dotted name below cifar_jax ('train', 'models', 'models.resnet')."""
  modules = {}
  for folder, _, names in os.walk(PACKAGE):
    prefix = os.path.relpath(folder, PACKAGE).replace(os.sep, '.')
    for name in sorted(names):
      if not name.endswith('.py') or (name == '__init__.py' and prefix == '.'):
        continue
      module = prefix if name == '__init__.py' else (name[:-3] if prefix == '.' else f'{prefix}.{name[:-3]}')
      modules[module] = ast.parse(open(os.path.join(folder, name)).read())
  return modules


def _imported(node) -> list[str]:
  """The names a module-level or nested import statement brings in ('cifar_jax.x', 'cifar_jax.models.x' or
  'numpy')."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    if node.module in ('cifar_jax', 'cifar_jax.models', 'cifar_jax.torch_models'):
      return [f'{node.module}.{a.name}' for a in node.names]
    return [node.module]
  return []


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
  """module -> the package's modules it imports (anywhere in it); a package's module imports its package's
  __init__ only when it names it."""
  graph = {}
  for name, tree in modules.items():
    targets = set()
    for node in ast.walk(tree):
      for imported in _imported(node):
        if imported.startswith('cifar_jax.'):
          dotted = imported[len('cifar_jax.'):]
          while dotted and dotted not in modules:
            dotted = dotted.rpartition('.')[0]
          if dotted:
            targets.add(dotted)
    graph[name] = targets - {name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as a path [a, b, ..., a], or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, path + [nxt])
        if cycle:
          return cycle
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_no_import_cycle_in_the_package():
  graph = import_graph(_modules())
  assert {'train', 'loop', 'program', 'builders', 'steps', 'checkpointing', 'errors'} <= set(graph)
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))
  assert graph['errors'] == set()


def test_imports_at_the_top_except_optional_dependencies():
  nested = []
  for name, tree in _modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          nested += [f'{name}.{node.name}: {m}' for m in _imported(inner)
                     if m.split('.')[0] not in OPTIONAL and not m.startswith(OPTIONAL)]
  assert not nested, nested


def test_every_np_load_refuses_pickles():
  """`np.load` of a file holding an object array runs the pickle inside it unless allow_pickle=False; numpy's
  default is False, and every call says so explicitly (package, scripts and tests)."""
  root = os.path.dirname(PACKAGE)
  loose = []
  for folder in ('cifar_jax', 'cifar_jax/models', 'cifar_jax/torch_models', 'scripts', 'scripts/bench',
                 'scripts/gpu', 'scripts/maintainers', 'tests'):
    if not os.path.isdir(os.path.join(root, folder)):
      continue
    for name in sorted(os.listdir(os.path.join(root, folder))):
      if not name.endswith('.py'):
        continue
      for node in ast.walk(ast.parse(open(os.path.join(root, folder, name)).read())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'load'
            and isinstance(node.func.value, ast.Name) and node.func.value.id in ('np', 'numpy')):
          allow = {k.arg: k.value for k in node.keywords}.get('allow_pickle')
          if not (isinstance(allow, ast.Constant) and allow.value is False):
            loose.append(f'{folder}/{name}:{node.lineno}')
  assert not loose, loose
