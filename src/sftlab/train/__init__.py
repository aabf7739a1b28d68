"""Training side: the loop, optimizer and schedule, checkpoints, metrics.

This package is also the Python API's `sftlab.train(...)`: Python binds `sftlab.train` to this
package as soon as any `sftlab.train.<module>` is imported, which would hide the function of that
name, so the package itself is callable and hands the call to `sftlab.api.train` (the one facade
edge from this layer up; tests/test_structure.py names it).
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from sftlab.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
