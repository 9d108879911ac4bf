"""The package's array names against the axis glossary of dynmoe_jax/__init__.py: every letter
of a name's shape suffix (``x_BTD``), of an einsum string and of a module's own "Axis letters"
paragraph is defined in the glossary, each letter there is defined once and used, a suffix
names each axis once, and its digits are those the glossary defines."""

import ast
import re
from pathlib import Path

import dynmoe_jax

PACKAGE = Path(dynmoe_jax.__file__).parent
# A name that starts in lower case (constants in ALL_CAPS are not arrays) and ends in "_" and a
# suffix of axis letters: upper case, digits (axes of that size) and lower-case letters (one
# device's share of that axis), at least one upper case (``fan_in``, ``header_1_0`` have none).
ARRAY_NAME = re.compile(r"_*[a-z][a-z0-9_]*_(?=[a-z0-9]*[A-Z])([A-Za-z0-9]+)")
GLOSSARY_ROW = re.compile(r"([A-Z])   \S")


def glossary(doc: str) -> list[str]:
    """The letters of the table between the docstring's first two ``==`` rules, in order."""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("==  ==")]
    assert len(rules) >= 2, "the package docstring has no axis table"
    rows = lines[rules[0] + 1 : rules[1]]
    return [m.group(1) for line in rows if (m := GLOSSARY_ROW.match(line))]


def glossary_digits(doc: str) -> set[str]:
    """The digits the glossary gives a meaning (written ````1````)."""
    return set(re.findall(r"``(\d)``", doc))


def _names(tree: ast.AST):
    """Every name that binds or reads a value: variables, parameters, attributes, keywords,
    functions and classes."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            yield node.arg
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name


def _einsum_specs(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "einsum"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def _axis_paragraph(tree: ast.Module) -> str:
    """A module docstring's paragraph that starts "Axis letters" ("" when it has none)."""
    paragraphs = (ast.get_docstring(tree) or "").split("\n\n")
    return next((p for p in paragraphs if p.startswith("Axis letters") and "==" not in p), "")


def letters_used(source: str) -> dict[str, set[str]]:
    """The axis letters (upper case) that each array name, einsum string and "Axis letters"
    paragraph of ``source`` uses."""
    tree = ast.parse(source)
    found = {}
    for name in _names(tree):
        if m := ARRAY_NAME.fullmatch(name):
            found[name] = {c.upper() for c in m.group(1) if c.isalpha()}
    for spec in _einsum_specs(tree):
        found[spec] = {c.upper() for c in spec if c.isalpha()}
    if paragraph := _axis_paragraph(tree):
        found["Axis letters"] = set(re.findall(r"\b([A-Z])\b", paragraph))
    return found


def undefined(source: str, letters: set[str]) -> dict[str, set[str]]:
    """The names of ``source`` that use a letter outside ``letters``, with those letters."""
    found = letters_used(source).items()
    return {name: used - letters for name, used in found if used - letters}


def malformed(source: str, digits: set[str]) -> list[str]:
    """Array names of ``source`` whose suffix names an axis twice or has an undefined digit."""
    bad = []
    for name in _names(ast.parse(source)):
        if m := ARRAY_NAME.fullmatch(name):
            axes = [c.upper() for c in m.group(1) if c.isalpha()]
            if len(axes) != len(set(axes)) or set(re.findall(r"\d", m.group(1))) - digits:
                bad.append(name)
    return bad


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_glossary_defines_each_letter_once():
    letters = glossary(dynmoe_jax.__doc__)
    assert sorted(letters) == sorted(set(letters))
    assert {"B", "T", "D", "E"} <= set(letters)


def test_every_name_uses_glossary_letters():
    letters = set(glossary(dynmoe_jax.__doc__))
    digits = glossary_digits(dynmoe_jax.__doc__)
    bad = {path: undefined(source, letters) for path, source in _sources().items()}
    assert {path: found for path, found in bad.items() if found} == {}
    twice = {path: malformed(source, digits) for path, source in _sources().items()}
    assert {path: names for path, names in twice.items() if names} == {}


def test_every_glossary_letter_is_used():
    used = set()
    for source in _sources().values():
        used.update(*letters_used(source).values())
    assert set(glossary(dynmoe_jax.__doc__)) - used == set()


def test_a_letter_outside_the_glossary_is_found():
    source = '''"""A module.

Axis letters: B batch, W width.
"""
def f(x_BTD, w_DkW):
    y_BTW = jnp.einsum("BTD,DW->BTW", x_BTD, w_DkW)
    MAX_W = 3
    return model.out_1W(y_BTW, fan_in=MAX_W)
'''
    assert undefined(source, {"B", "T", "D", "K"}) == {
        "w_DkW": {"W"},
        "y_BTW": {"W"},
        "out_1W": {"W"},
        "BTD,DW->BTW": {"W"},
        "Axis letters": {"W"},
    }
    assert undefined(source, {"B", "T", "D", "K", "W"}) == {}


def test_a_repeated_axis_or_undefined_digit_is_found():
    source = "x_BTT = y_BdD + z_B3D + w_B1D + v_gSD\n"
    assert sorted(malformed(source, {"1"})) == ["x_BTT", "y_BdD", "z_B3D"]


def test_glossary_parser_reads_only_the_table():
    doc = "Intro X_Y, ``1``.\n\n==  ==\nA   first\n    (more of A)\nB   second\n==  ==\nC   no\n"
    assert glossary(doc) == ["A", "B"]
    assert glossary_digits(doc) == {"1"}
