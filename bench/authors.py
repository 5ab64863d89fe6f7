"""The authors' release as the benches load it: modules of a checkout that stays outside this
repository (--authors_repo), under names of their own, since ours are models_mvg and util too."""

import importlib.util
import os
import sys


def authors_module(repo: str, name: str):
    """`name` (a path inside the checkout without .py, e.g. "utils/lr_decay") as a module."""
    if repo not in sys.path:
        sys.path.append(repo)  # what their modules import from one another
    spec = importlib.util.spec_from_file_location(f"authors_{name.replace('/', '_')}", os.path.join(repo, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
