"""Pipeline versions on a running server: what is loaded, rollout, rollback.

Version N of the trillm pipeline is version N of ``preprocessing``,
``tensorrt_llm``, ``postprocessing`` and ``tensorrt_llm_bls``, and
``ensemble`` version N with every step pinned to N (docs/versions.md).
Triton gives an ensemble one step list for all its versions, so the ensemble
serves one version at a time; the other models can serve several.

:func:`rollout` moves a server in explicit model-control mode from version A
to B without mixing pipelines and without a moment where unpinned requests
find no ready version:

1. **stage**: the composing models load B beside A. Triton reloads a model
   whose set of versions changes, but A keeps serving until the reload is
   ready, and unpinned traffic never reaches B (the ensemble is pinned to A,
   ``tensorrt_llm_bls`` holds only A).
2. **canary**: a temporary ensemble pinned to B (``<ensemble>_canary``,
   loaded from the server's own ensemble config) answers the canary
   requests, streamed and not; then it is unloaded.
3. **promote**: ``ensemble`` reloads pinned to B and ``tensorrt_llm_bls``
   reloads holding only B. Requests already running on A finish on A.
4. **verify**: one request pinned to B on each; if it fails they go back to A.
5. **drain**: wait until their A versions have finished and unloaded.

A failure in steps 1-2 unloads B again; A stays the default throughout. The
composing models keep A and B loaded afterwards, so :func:`rollback` (a
rollout to the earlier loaded version) skips the stage step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from trillm_client.admin import ModelControl
from trillm_client.client import Client
from trillm_client.errors import TrillmError

# States in which a version still holds or may take requests.
BUSY_STATES = ("READY", "LOADING", "UNLOADING")
CANARY_PROMPTS = ("The capital of France is", "Grüße aus Köln, 東京 🙂", "def fibonacci(n):")


class RolloutError(TrillmError):
    """A rollout or rollback failed; the message says which version is serving."""


@dataclass(frozen=True)
class Pipeline:
    """The models a version number spans."""

    ensemble: str = "ensemble"
    bls: str = "tensorrt_llm_bls"
    composing: tuple[str, ...] = ("preprocessing", "tensorrt_llm", "postprocessing")

    @property
    def models(self) -> tuple[str, ...]:
        return (*self.composing, self.bls, self.ensemble)

    @property
    def canary(self) -> str:
        return f"{self.ensemble}_canary"


@dataclass(frozen=True)
class Canary:
    """The canary requests: each prompt greedy, whole and streamed."""

    prompts: tuple[str, ...] = CANARY_PROMPTS
    max_tokens: int = 16
    timeout: float = 300.0


@dataclass
class PipelineState:
    """What the server holds: each model's versions and their states, and the ensemble's pinned steps."""

    versions: dict[str, dict[int, str]]
    ensemble_steps: dict[str, int]

    def ready(self, model: str) -> list[int]:
        return sorted(v for v, state in self.versions.get(model, {}).items() if state == "READY")

    def ready_everywhere(self, models: Iterable[str]) -> list[int]:
        """The versions ready in every one of ``models``."""
        sets = [set(self.ready(m)) for m in models]
        return sorted(set.intersection(*sets)) if sets else []

    def serving(self, pipeline: Pipeline) -> int:
        """The version unpinned requests get; RolloutError if the frontends disagree."""
        ensemble, bls = self.ready(pipeline.ensemble), self.ready(pipeline.bls)
        if len(ensemble) != 1:
            raise RolloutError(f"'{pipeline.ensemble}' must have exactly one ready version, has {ensemble or 'none'}")
        version = ensemble[0]
        pins = sorted(set(self.ensemble_steps.values()))
        if pins != [version]:
            raise RolloutError(
                f"'{pipeline.ensemble}' version {version} runs steps pinned to {pins}: a mixed pipeline; "
                f"roll out a version to repair it"
            )
        if bls and max(bls) != version:
            raise RolloutError(
                f"'{pipeline.bls}' serves version {max(bls)} to unpinned requests but '{pipeline.ensemble}' "
                f"serves {version}; roll out a version to repair it"
            )
        return version


@dataclass
class RolloutReport:
    from_version: int
    to_version: int
    seconds: float
    staged: list[str]  # composing models that loaded to_version


def with_versions(config: dict[str, Any], versions: Iterable[int]) -> dict[str, Any]:
    """A copy of a model config that loads exactly ``versions``."""
    out = copy.deepcopy(config)
    out["version_policy"] = {"specific": {"versions": sorted(set(versions))}}
    return out


def pinned_ensemble(config: dict[str, Any], version: int, name: str | None = None) -> dict[str, Any]:
    """A copy of an ensemble config serving only ``version``, every step pinned to it."""
    out = with_versions(config, [version])
    if name:
        out["name"] = name
    for step in out["ensemble_scheduling"]["step"]:
        step["model_version"] = version
    return out


def pipeline_state(control: ModelControl, pipeline: Pipeline = Pipeline()) -> PipelineState:
    versions: dict[str, dict[int, str]] = {model: {} for model in pipeline.models}
    for info in control.index():
        if info.name in versions and info.version.isdigit():
            versions[info.name][int(info.version)] = info.state
    steps: dict[str, int] = {}
    if any(state == "READY" for state in versions[pipeline.ensemble].values()):
        for step in control.config(pipeline.ensemble)["ensemble_scheduling"]["step"]:
            steps[step["model_name"]] = int(step["model_version"])
    return PipelineState(versions, steps)


def run_canary(url: str, protocol: str, model: str, version: int, canary: Canary) -> list[str]:
    """The problems of ``model`` ``version`` on the canary requests (empty: it passed)."""
    problems = []
    with Client(url, protocol=protocol, model=model, version=version, timeout=canary.timeout) as client:
        for prompt in canary.prompts:
            try:
                whole = client.generate(prompt, canary.max_tokens)
                streamed = client.stream(prompt, canary.max_tokens).text()
            except TrillmError as exc:
                problems.append(f"{prompt!r}: {type(exc).__name__}: {exc.message}")
                continue
            if not whole.num_output_tokens:
                problems.append(f"{prompt!r}: no tokens generated")
            elif streamed != whole.text:
                problems.append(f"{prompt!r}: the streamed text differs from the whole text")
            if whole.model_version != str(version):
                problems.append(f"{prompt!r}: answered by version {whole.model_version}, not {version}")
    return problems


# probe(model, version, canary) -> the problems of that model version on the canary requests
Probe = Callable[[str, int, Canary], list[str]]


class Rollout:
    """Rollouts and rollbacks of ``pipeline`` on the server behind ``control``.

    ``say`` receives a line per step. ``probe`` sends the canary requests;
    by default :func:`run_canary` on the same server as ``control``.
    """

    def __init__(
        self,
        control: ModelControl,
        pipeline: Pipeline = Pipeline(),
        canary: Canary = Canary(),
        say: Callable[[str], None] = lambda line: None,
        drain_timeout: float = 600.0,
        probe: Probe | None = None,
    ) -> None:
        self.control = control
        self.pipeline = pipeline
        self.canary = canary
        self.say = say
        self.drain_timeout = drain_timeout
        self.probe = probe or (
            lambda model, version, canary: run_canary(control.url, control.protocol, model, version, canary)
        )

    def state(self) -> PipelineState:
        return pipeline_state(self.control, self.pipeline)

    def to(self, version: int) -> RolloutReport:
        """Makes ``version`` the pipeline's default (the steps in the module docstring)."""
        started = time.monotonic()
        state = self.state()
        current = state.serving(self.pipeline)
        if version == current:
            self.say(f"version {version} is already the default; nothing to do")
            return RolloutReport(current, version, time.monotonic() - started, [])
        before = {model: state.ready(model) for model in self.pipeline.composing}
        staged = self._stage(before, current, version)
        try:
            self._canary(current, version)
        except RolloutError:
            self._restore({model: before[model] for model in staged})
            raise
        self._promote(current, version)
        self._drain(current)
        self._check_composing(current, version)
        seconds = time.monotonic() - started
        self.say(f"done in {seconds:.1f} s: version {version} is the default, version {current} stays loaded")
        return RolloutReport(current, version, seconds, staged)

    def back(self, to: int | None = None) -> RolloutReport:
        """Rolls back to ``to``, by default the highest loaded version below the current one."""
        state = self.state()
        current = state.serving(self.pipeline)
        if to is None:
            earlier = [v for v in state.ready_everywhere(self.pipeline.composing) if v < current]
            if not earlier:
                raise RolloutError(
                    f"no version before {current} is loaded in {', '.join(self.pipeline.composing)}: "
                    "name the version to go back to"
                )
            to = max(earlier)
        self.say(f"rolling back from version {current} to version {to}")
        return self.to(to)

    # -- steps ---------------------------------------------------------------
    def _load_all(self, versions: dict[str, list[int]]) -> dict[str, TrillmError]:
        """Loads each model holding its ``versions``; returns the failures (such a model keeps what it had).

        One at a time: each load also reloads the ensembles that use the model,
        so Triton never juggles two of an ensemble's models at once, and what a
        failure leaves behind is plain.
        """
        failed = {}
        for model, wanted in versions.items():
            try:
                self.control.load(model, with_versions(self.control.config(model), wanted))
            except TrillmError as exc:
                failed[model] = exc
        return failed

    def _stage(self, before: dict[str, list[int]], current: int, version: int) -> list[str]:
        """The composing models hold exactly ``current`` and ``version``; returns those that changed."""
        versions = sorted({current, version})
        models = [m for m in self.pipeline.composing if before[m] != versions]
        if not models:
            self.say(f"stage: {', '.join(self.pipeline.composing)} already hold versions {versions}")
            return []
        self.say(f"stage: loading versions {versions} of {', '.join(models)}")
        failed = {m: e.message for m, e in self._load_all({m: versions for m in models}).items()}
        # Triton loads what a specific policy names *and exists*: a version missing
        # from the server's repository is not an error there, so look.
        state = self.state()
        for model in models:
            if model not in failed and version not in state.ready(model):
                failed[model] = f"version {version} did not load (is it in the server's model repository?)"
        if failed:
            self._restore({m: before[m] for m in models if state.ready(m) != before[m]})
            detail = "; ".join(f"{m}: {message}" for m, message in failed.items())
            raise RolloutError(f"stage of version {version} failed ({detail}); version {current} is still the default")
        return models

    def _canary(self, current: int, version: int) -> None:
        ensemble = self.control.config(self.pipeline.ensemble)
        name = self.pipeline.canary
        self.say(f"canary: {len(self.canary.prompts)} requests through '{name}', pinned to version {version}")
        try:
            self.control.load(
                name,
                pinned_ensemble(ensemble, version, name=name),
                # An ensemble has no files, but the version needs a directory.
                files={f"file:{version}/README": b"trillm rollout canary: the ensemble pinned to this version\n"},
            )
            problems = self.probe(name, version, self.canary)
        except TrillmError as exc:
            problems = [f"{type(exc).__name__}: {exc.message}"]
        finally:
            try:
                self.control.unload(name)
            except TrillmError as exc:
                self.say(f"canary: could not unload '{name}': {exc.message}")
        if problems:
            raise RolloutError(
                f"canary of version {version} failed ({'; '.join(problems)}); version {current} is still the default"
            )
        self.say("canary: passed")

    def _restore(self, versions: dict[str, list[int]]) -> None:
        """Puts each model back on the versions it held before."""
        if not versions:
            return
        self.say("abort: " + ", ".join(f"{m} back to versions {v}" for m, v in versions.items()))
        for model, error in self._load_all(versions).items():
            self.say(f"abort: {model} could not be restored: {error.message}")

    def _frontends_to(self, version: int) -> None:
        p = self.pipeline
        self.control.load(p.ensemble, pinned_ensemble(self.control.config(p.ensemble), version))
        self.control.load(p.bls, with_versions(self.control.config(p.bls), [version]))

    def _promote(self, current: int, version: int) -> None:
        p = self.pipeline
        self.say(f"promote: '{p.ensemble}' pinned to version {version}, '{p.bls}' holding version {version}")
        try:
            self._frontends_to(version)
            one = Canary(self.canary.prompts[:1], self.canary.max_tokens, self.canary.timeout)
            problems = [f"{model}: {x}" for model in (p.ensemble, p.bls) for x in self.probe(model, version, one)]
        except TrillmError as exc:
            problems = [f"{type(exc).__name__}: {exc.message}"]
        if problems:
            self.say(f"verify failed; putting '{p.ensemble}' and '{p.bls}' back on version {current}")
            self._frontends_to(current)
            raise RolloutError(f"version {version} failed after promotion ({'; '.join(problems)}); "
                               f"version {current} is the default again")
        self.say(f"verify: '{p.ensemble}' and '{p.bls}' answer as version {version}")

    def _drain(self, version: int) -> None:
        """Waits until the frontends' ``version`` has finished its requests and unloaded."""
        frontends = (self.pipeline.ensemble, self.pipeline.bls)
        self.say(f"drain: waiting for version {version} of {', '.join(frontends)} to finish its requests")
        deadline = time.monotonic() + self.drain_timeout
        while True:
            state = self.state()
            busy = [m for m in frontends if state.versions.get(m, {}).get(version) in BUSY_STATES]
            if not busy:
                return
            if time.monotonic() > deadline:
                self.say(f"drain: version {version} of {', '.join(busy)} still busy after {self.drain_timeout:.0f} s")
                return
            time.sleep(0.2)

    def _check_composing(self, previous: int, version: int) -> None:
        """The composing models must still hold both versions (a reload from disk would have dropped one)."""
        state = self.state()
        lost = [m for m in self.pipeline.composing if not {previous, version} <= set(state.ready(m))]
        if lost:
            raise RolloutError(
                f"{', '.join(lost)} no longer hold versions {previous} and {version}: the server reloaded them "
                "from disk (a file in their directory changed; run tritonserver with PYTHONDONTWRITEBYTECODE=1)"
            )
