"""Model versions on disk, and the version policy ``trillm serve`` renders.

A version number names a whole pipeline: version N of ``ensemble`` runs
version N of ``preprocessing``, ``tensorrt_llm`` and ``postprocessing``, and
so does version N of ``tensorrt_llm_bls``. So every model of the repository
holds the same version directories, and a version directory may carry a
``parameters.json`` that overrides that model's ``config.pbtxt`` parameters
for that version only (trillm.triton.params). docs/versions.md tells the rest.

Triton reads one ``config.pbtxt`` per model, shared by all its versions; an
ensemble's steps name one version each. So the ensemble serves exactly one
version, the one an unpinned request would get under the policy, with every
step pinned to it; the other models load what the policy says.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trillm.options import OPTIONS
from trillm.templates import repository_placeholders

POLICY_KINDS = ("latest", "all", "specific")
POLICY_SYNTAX = "expected latest, latest:N, all or specific:V[,V...]"
# What each version directory of a model needs besides parameters.json; the
# ensemble has no files, so git keeps its version directories with a .gitkeep.
VERSION_FILES = ("model.py", ".gitkeep")


class VersionError(ValueError):
    pass


@dataclass(frozen=True)
class VersionPolicy:
    """Triton's ``version_policy``: ``latest`` (the N highest), ``all``, or ``specific`` versions.

    Written on the command line as ``latest``, ``latest:N``, ``all`` or
    ``specific:V[,V...]``.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise VersionError(f"version policy: must be one of {', '.join(POLICY_KINDS)}, got {self.kind!r}")
        if self.kind == "latest" and self.num_versions < 1:
            raise VersionError(f"version policy latest:N: N must be >= 1, got {self.num_versions}")
        if self.kind == "specific" and (not self.versions or min(self.versions) < 1):
            raise VersionError(f"version policy specific: needs version numbers >= 1, got {list(self.versions)}")

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                return cls("latest", num_versions=int(arg) if arg else 1)
            if kind == "specific":
                return cls("specific", versions=tuple(sorted({int(v) for v in arg.split(",") if v.strip()})))
        except ValueError:
            raise VersionError(f"version policy {text!r}: {POLICY_SYNTAX}") from None
        if kind == "all" and not arg:
            return cls("all")
        raise VersionError(f"version policy {text!r}: {POLICY_SYNTAX}")

    def __str__(self) -> str:
        if self.kind == "latest":
            return "latest" if self.num_versions == 1 else f"latest:{self.num_versions}"
        if self.kind == "all":
            return "all"
        return "specific:" + ",".join(map(str, self.versions))

    def pbtxt(self) -> str:
        """The value of ``version_policy:`` in a config.pbtxt."""
        if self.kind == "latest":
            return f"{{ latest: {{ num_versions: {self.num_versions} }} }}"
        if self.kind == "all":
            return "{ all: { } }"
        return f"{{ specific: {{ versions: [ {', '.join(map(str, self.versions))} ] }} }}"

    def as_config(self) -> dict:
        """The same, as the JSON model config of Triton's load API."""
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "all":
            return {"all": {}}
        return {"specific": {"versions": list(self.versions)}}

    def served(self, available: list[int]) -> list[int]:
        """The versions Triton loads from ``available`` under this policy."""
        if self.kind == "latest":
            return sorted(available)[-self.num_versions:]
        if self.kind == "all":
            return sorted(available)
        missing = sorted(set(self.versions) - set(available))
        if missing:
            raise VersionError(
                f"version policy {self}: version(s) {', '.join(map(str, missing))} not in the repository "
                f"(it has {', '.join(map(str, available)) or 'none'})"
            )
        return list(self.versions)

    def default(self, available: list[int]) -> int:
        """The version an unpinned request gets: Triton picks the highest one loaded."""
        return max(self.served(available))


def model_versions(repository: Path) -> dict[str, list[int]]:
    """Each model (a directory with a config.pbtxt) and its numeric version directories."""
    repository = Path(repository)
    found = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        model = config.parent
        found[model.name] = sorted(int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit())
    return found


def pipeline_versions(repository: Path) -> list[int]:
    """The versions of the repository's pipeline; every model must hold all of them."""
    versions = model_versions(repository)
    if not versions:
        raise VersionError(f"{repository} holds no <model>/config.pbtxt")
    union = sorted(set().union(*map(set, versions.values())))
    lacking = {model: sorted(set(union) - set(have)) for model, have in versions.items() if set(have) != set(union)}
    if lacking:
        detail = "; ".join(f"{model} lacks {', '.join(map(str, missing))}" for model, missing in lacking.items())
        raise VersionError(
            f"{repository}: a version number names the whole pipeline, so every model needs every version "
            f"directory ({detail})"
        )
    if not union:
        raise VersionError(f"{repository}: no model has a version directory")
    return union


def add_pipeline_version(repository: Path, version: int) -> dict[str, Path]:
    """Create version ``version`` of every model, each like that model's lowest version.

    Copies only the files every version needs (the ``model.py`` shim, the
    ensemble's ``.gitkeep``), not a version's own ``parameters.json``.
    Refuses a version that exists in any model.
    """
    if version < 1:
        raise VersionError(f"version must be >= 1, got {version}")
    versions = model_versions(repository)
    taken = [model for model, have in versions.items() if version in have]
    if taken:
        raise VersionError(f"version {version} already exists in {', '.join(taken)}: pick a new version number")
    created = {}
    for model, have in versions.items():
        target = Path(repository) / model / str(version)
        target.mkdir()
        if have:
            template = Path(repository) / model / str(have[0])
            for name in VERSION_FILES:
                if (template / name).exists():
                    shutil.copy2(template / name, target / name)
        created[model] = target
    return created


# Per-version placeholders of parameters.json templates, e.g. ${checkpoint_dir_v2}: one for each
# option that takes a value per version (trillm.options, per_version).
VERSION_PLACEHOLDER = re.compile(rf"^({'|'.join(o.name for o in OPTIONS if o.per_version)})_v(\d+)$")


def checkpoint_versions(repository: Path) -> set[int]:
    """The versions whose parameters.json templates take a checkpoint or tokenizer of their own."""
    found = set()
    for name in repository_placeholders(repository):
        match = VERSION_PLACEHOLDER.match(name)
        if match:
            found.add(int(match.group(2)))
    return found
