"""Jinja2's private API as sftlab uses it (jinja2 3.1.6)."""

from __future__ import annotations

from typing import Any

import jinja2


def render_shared(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """`template` rendered with `variables` as its whole context (the caller has merged the template's globals
    in once), without `Template.render` copying the globals into a new dict on every call.

    Touches: `Template.root_render_func` (the compiled template's undocumented render generator), fed by
    `Template.new_context(variables, shared=True)` (documented). Written against jinja2 3.1.6.
    Public alternative: `template.render(variables)` -- the same text, re-merging the globals per call."""
    return "".join(template.root_render_func(template.new_context(variables, shared=True)))
