"""The house rules the code keeps: no private (`_name`) imports across packages, and layers that point
one way (server -> engine -> model -> ops; the gateway talks to servers over HTTP and shares only
the server's request types and errors)."""
import ast
import os

from tests.server_utils import ROOT

TREES = ("scalellm", "tests", "bench", "tools")
# what each package may not import: the layers below never reach up
FORBIDDEN = {
    "scalellm.ops": ("scalellm.model", "scalellm.engine", "scalellm.server", "scalellm.gateway", "scalellm.llm"),
    "scalellm.model": ("scalellm.engine", "scalellm.server", "scalellm.gateway", "scalellm.llm"),
    "scalellm.structured": ("scalellm.engine", "scalellm.server", "scalellm.gateway", "scalellm.model"),
    "scalellm.engine": ("scalellm.server", "scalellm.gateway", "scalellm.llm"),
    "scalellm.server": ("scalellm.gateway",),
    "scalellm.gateway": ("scalellm.engine", "scalellm.model", "scalellm.ops", "scalellm.llm"),
}


def modules():
    """(path, dotted module name, its package) for every Python file of the project."""
    for tree in TREES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, tree)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    package = dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted.rpartition(".")[0]
                    yield path, dotted, package


def is_module(dotted: str) -> bool:
    path = os.path.join(ROOT, *dotted.split("."))
    return os.path.isdir(path) or os.path.isfile(path + ".py")


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def project_imports(tree: ast.AST):
    """(line, module) for each import of a project module, and the local names bound to modules."""
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("scalellm"):
                    found.append((node.lineno, a.name, None))
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("scalellm"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if is_module(full):
                    found.append((node.lineno, full, None))
                    bound[a.asname or a.name] = full
                else:
                    found.append((node.lineno, node.module, a.name))
    return found, bound


def test_no_private_name_is_used_across_packages():
    crossings = []
    for path, dotted, package in modules():
        tree = ast.parse(open(path).read(), path)
        found, bound = project_imports(tree)
        where = os.path.relpath(path, ROOT)
        for line, module, name in found:
            owner = module.rpartition(".")[0] if name is None else module
            parts = module.split(".") + ([name] if name else [])
            if any(private(p) for p in parts) and owner != package:
                crossings.append(f"{where}:{line} imports {module}{'.' + name if name else ''}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name):
                module = bound.get(node.value.id)
                if module is not None and module.rpartition(".")[0] != package and module != package:
                    crossings.append(f"{where}:{node.lineno} uses {module}.{node.attr}")
    assert not crossings, "private names used outside their package:\n" + "\n".join(sorted(set(crossings)))


def test_layers_point_one_way():
    upward = []
    for path, dotted, package in modules():
        rules = [bad for owner, bad in FORBIDDEN.items() if dotted == owner or dotted.startswith(owner + ".")]
        if not rules:
            continue
        found, _ = project_imports(ast.parse(open(path).read(), path))
        for line, module, _name in found:
            if any(module == b or module.startswith(b + ".") for b in rules[0]):
                upward.append(f"{os.path.relpath(path, ROOT)}:{line} imports {module}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
