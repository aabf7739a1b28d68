"""One error hierarchy: every exception class sftlab defines derives from `sftlab.errors.SftlabError`, so a
caller (the CLI included) catches one class and tells sftlab's own refusals from a bug."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import sftlab
from sftlab.errors import SftlabError


def _defined_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a module of the sftlab package (each module imported)."""
    found = []
    for info in pkgutil.walk_packages(sftlab.__path__, "sftlab."):
        module = importlib.import_module(info.name)
        found += [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
        ]
    return found


def test_every_sftlab_exception_derives_from_sftlab_error():
    found = _defined_exceptions()
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in found}
    # the walk reaches every layer (ConfigError is checked too: no class is exempt)
    assert {
        "sftlab.data.types.DataError",
        "sftlab.model.loading.ModelLoadError",
        "sftlab.trainer.rundir.RunError",
        "sftlab.trainer.control.Interrupted",
    } <= names
    assert any(name.endswith(".ConfigError") for name in names)
    offenders = sorted(
        f"{cls.__module__}.{cls.__qualname__}" for cls in found if not issubclass(cls, SftlabError)
    )
    assert not offenders, "exception classes not deriving from sftlab.errors.SftlabError:\n" + "\n".join(
        offenders
    )


def test_each_error_keeps_its_builtin_base():
    """Callers that catch ValueError / RuntimeError (and older user code) still catch sftlab's errors."""
    from sftlab.data.types import BadRecord, DataError
    from sftlab.trainer.optim import OptimizerError
    from sftlab.trainer.rundir import RunError

    assert issubclass(DataError, ValueError) and issubclass(BadRecord, ValueError)
    assert issubclass(OptimizerError, ValueError) and issubclass(RunError, RuntimeError)
