"""Fill the ``${name}`` placeholders of a model repository's templates.

The templates are each model's ``config.pbtxt`` and each version's
``parameters.json`` (per-version parameter overrides, trillm.triton.params).
A repository is rendered as a whole, so that a value nobody uses (a typo in
a key) is an error just like a placeholder nobody filled.
"""

from __future__ import annotations

import compileall
import re
import shutil
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
VERSION_PARAMETERS = "parameters.json"


class TemplateError(ValueError):
    pass


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def fill(text: str, values: dict[str, object], where: str = "template") -> str:
    """Replace every ``${name}``; a placeholder without a value is an error."""
    missing = sorted(placeholders(text) - set(values))
    if missing:
        raise TemplateError(f"{where}: no value for placeholder(s) {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def templates(src: Path) -> list[Path]:
    """Every template of the repository ``src``: config.pbtxt files, then parameters.json files."""
    src = Path(src)
    return sorted(src.glob("*/config.pbtxt")) + sorted(src.glob(f"*/[0-9]*/{VERSION_PARAMETERS}"))


def repository_placeholders(src: Path) -> set[str]:
    """The names of every placeholder in the repository's templates."""
    used: set[str] = set()
    for template in templates(src):
        used |= placeholders(template.read_text())
    return used


def render_repository(src: Path, dst: Path, values: dict[str, object]) -> list[Path]:
    """Copy the model repository ``src`` to ``dst`` with every template filled.

    Returns the rendered config.pbtxt files (parameters.json files are rendered
    too). Raises TemplateError for an unfilled placeholder or for a value that
    no template uses.

    The ``model.py`` files are compiled here, by this Python (the one whose
    stub ``trillm serve`` runs the models in). Otherwise the Python backend
    writes ``__pycache__`` into a version directory as it loads it, and Triton
    takes that newer file as a change: the next time it looks at the model
    (when an ensemble that uses it loads, say) it reloads it from disk, undoing
    the config a load request gave it (what ``trillm rollout`` relies on).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise TemplateError(f"model repository {src} does not exist")
    if not list(src.glob("*/config.pbtxt")):
        raise TemplateError(f"{src} holds no <model>/config.pbtxt")
    unknown = sorted(set(values) - repository_placeholders(src))
    if unknown:
        raise TemplateError(f"value(s) {', '.join(unknown)} match no placeholder in {src}")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    rendered = []
    for template in templates(src):
        out = dst / template.relative_to(src)
        out.write_text(fill(template.read_text(), values, where=str(template)))
        if template.name == "config.pbtxt":
            rendered.append(out)
    compileall.compile_dir(dst, quiet=1)
    return rendered
