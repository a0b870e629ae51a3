"""Exercise checkers, one per exercise, grouped by notebook (nb01.py, nb02.py, ...).

    from course_lib import checks
    checks.check_softmax(my_softmax)      # prints [PASSED] ... or [NOT YET] ... with a hint

Every public `check_*` function of the notebook modules is re-exported here; two notebook
modules exporting the same name is an error (one checker would silently replace the other).
"""

import importlib
import pkgutil

from course_lib.checks._core import CheckResult

__all__ = ["CheckResult"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("nb"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in getattr(_module, "__all__", []):
            if _name in globals():
                _first = globals()[_name].__module__
                raise ImportError(f"checker {_name!r} is exported by both {_first} and {_module.__name__}; rename one")
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)
