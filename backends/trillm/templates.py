"""Fill the ``${name}`` placeholders of a model repository's config.pbtxt files.

A repository is rendered as a whole, so that a value nobody uses (a typo in
a key) is an error just like a placeholder nobody filled.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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


def render_repository(src: Path, dst: Path, values: dict[str, object]) -> list[Path]:
    """Copy the model repository ``src`` to ``dst`` with every config.pbtxt filled.

    Returns the rendered config files. Raises TemplateError for an unfilled
    placeholder or for a value that no config uses.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise TemplateError(f"model repository {src} does not exist")
    configs = sorted(src.glob("*/config.pbtxt"))
    if not configs:
        raise TemplateError(f"{src} holds no <model>/config.pbtxt")
    used: set[str] = set()
    for config in configs:
        used |= placeholders(config.read_text())
    unknown = sorted(set(values) - used)
    if unknown:
        raise TemplateError(f"value(s) {', '.join(unknown)} match no placeholder in {src}")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    rendered = []
    for config in configs:
        out = dst / config.relative_to(src)
        out.write_text(fill(config.read_text(), values, where=str(config)))
        rendered.append(out)
    return rendered
