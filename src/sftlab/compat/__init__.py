"""Every touch of another library's private API, in one place: one module per library, one small named
function per touch, each saying what it touches, the version it was written against and the public
alternative (if any). The rest of sftlab calls these functions and nothing private of a third-party
object (tests/compat/test_confined.py scans for it); tests/compat/ checks each touch on tiny real
objects, so an upgrade that breaks one fails there, by name.

Written against: transformers 5.23.0, accelerate 1.15.0, datasets 5.2.0, torch 2.13.0, jinja2 3.1.6,
liger-kernel 0.8.5 (optional). Layer 0: imports no sftlab module. Modules are named after the library
they wrap; they import it with absolute imports (`import torch` in compat/torch.py is the real torch),
and callers import them under a `<library>_compat` alias so that the library's own name stays free.
"""
