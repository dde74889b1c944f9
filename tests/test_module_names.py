"""A script's folder comes first on sys.path: a module in bench/ or tools/ named like an installed
package or a standard-library module shadows it for everything the script imports (bench/kernels.py once
hid the `kernels` package transformers imports)."""
import importlib.metadata
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_modules(folder: str) -> list[str]:
    out = []
    for name in os.listdir(os.path.join(ROOT, folder)):
        path = os.path.join(ROOT, folder, name)
        if name.endswith(".py"):
            out.append(name[:-3])
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            out.append(name)
    return out


def test_no_script_module_shadows_an_installed_package():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    installed -= {"scalellm", "tools", "bench"}  # this project's own names
    clashes = {folder: sorted(set(script_modules(folder)) & installed)
               for folder in ("bench", "bench/experiments", "tools")}
    assert not any(clashes.values()), f"rename these modules, they shadow installed ones: {clashes}"


def test_the_check_knows_the_installed_names():
    """The names compared against hold what a clash would hit (an empty set would pass anything)."""
    assert "json" in set(sys.stdlib_module_names)
    assert {"torch", "numba", "transformers"} <= set(importlib.metadata.packages_distributions())
    assert "serving" in script_modules("bench") and "convert_gguf" in script_modules("tools")
