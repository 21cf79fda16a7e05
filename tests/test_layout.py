"""The package's import graph (read from the source with ast): no cycle, and no import inside a function
except of the optional dependencies (docs/architecture.md)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cifar_jax')
# Imported where they are used, so that a run without them (or without needing them) does not pay for them.
# matplotlib: only the LR range test plots (lr_find.plot); a training run does not import it.
# cv2, scipy (scipy.ndimage), skimage: only the CIFAR-10-C corruptions (cifar_jax/corruptions.py) use them.
OPTIONAL = ('torch', 'tensorflow_datasets', 'tensorboardX', 'matplotlib', 'cv2', 'scipy', 'skimage')


def _modules() -> dict[str, ast.Module]:
  return {name[:-3]: ast.parse(open(os.path.join(PACKAGE, name)).read())
          for name in sorted(os.listdir(PACKAGE)) if name.endswith('.py') and name != '__init__.py'}


def _imported(node) -> list[str]:
  """The names a module-level or nested import statement brings in ('cifar_jax.x' or 'numpy')."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    if node.module == 'cifar_jax':
      return [f'cifar_jax.{a.name}' for a in node.names]
    return [node.module]
  return []


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
  """module -> the package's modules it imports (anywhere in it)."""
  graph = {}
  for name, tree in modules.items():
    targets = set()
    for node in ast.walk(tree):
      for imported in _imported(node):
        if imported.startswith('cifar_jax.'):
          targets.add(imported.split('.')[1])
    graph[name] = targets & set(modules)
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
                     if m.split('.')[0] not in OPTIONAL]
  assert not nested, nested


def test_every_np_load_refuses_pickles():
  """`np.load` of a file holding an object array runs the pickle inside it unless allow_pickle=False; numpy's
  default is False, and every call says so explicitly (package, scripts and tests)."""
  root = os.path.dirname(PACKAGE)
  loose = []
  for folder in ('cifar_jax', 'scripts', 'tests'):
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
