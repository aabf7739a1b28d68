"""compat/jinja.py against the installed jinja2: `Template.root_render_func` still renders a context built by
`new_context(..., shared=True)` exactly as `Template.render` renders, errors included."""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftlab.compat import jinja as jinja_compat


def _template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["shout"] = lambda s: s.upper() + "!"
    return env.from_string(source)


def test_render_shared_renders_what_render_renders():
    template = _template(
        "{{ shout(name) }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}{{ missing | default('-') }}"
    )
    kwargs = {"name": "hi", "messages": [{"content": "a"}, {"content": "b"}], "add_generation_prompt": True}
    assert hasattr(template, "root_render_func")
    assert (
        jinja_compat.render_shared(template, {**template.globals, **kwargs})
        == template.render(**kwargs)
        == "HI![a][b]>-"
    )


def test_render_shared_raises_what_render_raises():
    template = _template("{% set _ = messages.append(1) %}{{ messages }}")  # the immutable sandbox refuses it
    with pytest.raises(jinja2.TemplateError) as rendered:
        template.render(messages=[])
    with pytest.raises(type(rendered.value)):
        jinja_compat.render_shared(template, {**template.globals, "messages": []})
