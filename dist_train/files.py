"""What a config names outside itself: files to read, and user code to import and call.

Each failure is a one-line ConfigError naming the config key.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from dist_train.errors import ConfigError, describe


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a readable regular file; a one-line ConfigError otherwise.

    Checked before opening: opening a FIFO would block, a directory would fail late.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} '{path}' not found")
    if p.is_dir():
        raise ConfigError(f"{what} '{path}' is a directory, not a file")
    if not p.is_file():
        raise ConfigError(f"{what} '{path}' is not a regular file (a FIFO or device?)")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} '{path}' is not readable; check its permissions")
    return p


def resolve_spec(spec: str, key: str) -> Callable[..., Any]:
    """'pkg.module:name' -> the callable it names (a function or a class); ConfigError naming `key` if it
    cannot be imported."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config key '{key}': '{spec}' is not of the form 'package.module:function'")
    # Like other tools that import user code by path (uvicorn, gunicorn), look in
    # the working directory too, so `dist-train` finds ./my_pkg as python -m would.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"config key '{key}': cannot import module '{module_name}' ({e})") from None
    except SyntaxError as e:
        raise ConfigError(
            f"config key '{key}': module '{module_name}' has a syntax error "
            f"({e.msg}, {Path(e.filename or '?').name} line {e.lineno})"
        ) from None
    except Exception as e:  # user code raising at import time
        raise ConfigError(f"config key '{key}': importing module '{module_name}' raised {describe(e)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"config key '{key}': module '{module_name}' has no callable '{attr}'")
    return fn


def declared_kwargs(fn: Callable[..., Any], key: str, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` declares, out of `offered` (a factory takes what it needs: `build(cfg,
    vocab_size)`, `Net()`, `make(num_classes)`). A required parameter that is not offered, or offered
    without a value (None: not known for this data), is a one-line ConfigError naming `key`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it bare
        return {}
    kwargs: dict[str, Any] = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is p.empty
        if name in offered and (offered[name] is not None or not required):
            if offered[name] is not None:
                kwargs[name] = offered[name]
        elif required:
            known = ", ".join(k for k, v in offered.items() if v is not None)
            why = (f"'{name}' is not known for this data" if name in offered else
                   f"'{name}' is not one it can be given")
            raise ConfigError(f"config key '{key}': '{getattr(fn, '__name__', fn)}' requires the argument {why}; "
                              f"it can declare any of: {known}")
    return kwargs
