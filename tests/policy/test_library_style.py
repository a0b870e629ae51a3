"""What a reader of course_lib can count on: every class says what it is, every forward what it returns,
and multi-head attention fits on a screen."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import course_lib
from course_lib import MultiHeadAttention

PACKAGE = Path(course_lib.__file__).parent


def _nodes():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            yield path.relative_to(PACKAGE).as_posix(), node


def test_every_class_has_a_docstring():
    missing = [f"{path}:{node.lineno} {node.name}" for path, node in _nodes()
               if isinstance(node, ast.ClassDef) and ast.get_docstring(node) is None]
    assert not missing, "classes without a docstring: " + ", ".join(missing)


def test_every_forward_and_backward_says_what_it_returns():
    missing = [f"{path}:{node.lineno} {node.name}" for path, node in _nodes()
               if isinstance(node, ast.FunctionDef) and node.name in ("forward", "backward") and node.returns is None]
    assert not missing, "forward/backward without a return annotation: " + ", ".join(missing)


def test_multi_head_attention_fits_on_a_screen():
    """The class a learner reads: at most 12 constructor parameters and a forward of about 30 lines of code."""
    params = inspect.signature(MultiHeadAttention.__init__).parameters
    assert len(params) - 1 <= 10, list(params)  # d_model, num_heads, dropout, bias, kdim, vdim, num_kv_heads, ...
    source = inspect.getsource(MultiHeadAttention.forward)
    body = ast.parse(source.strip() if source.startswith("def") else inspect.cleandoc("\n" + source)).body[0]
    docstring_end = body.body[0].end_lineno if ast.get_docstring(body) else body.lineno
    code_lines = [line for line in source.splitlines()[docstring_end - body.lineno + 1:]
                  if line.strip() and not line.strip().startswith("#")]
    assert len(code_lines) <= 30, len(code_lines)
    class_lines = len(inspect.getsource(MultiHeadAttention).splitlines())
    assert class_lines <= 110, class_lines
