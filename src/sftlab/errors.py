"""The base of every error sftlab raises on purpose: `SftlabError`. Each layer's error class derives from it
(and from the builtin it is, ValueError or RuntimeError), so a caller, the CLI included, catches one class
and tells sftlab's own refusals, which name the file, key or fix, from a bug."""

from __future__ import annotations


class SftlabError(Exception):
    """An error sftlab raises with a message meant for the user (what is wrong, where, and what to do)."""
