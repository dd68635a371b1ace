"""Every option of a served model pipeline, declared once.

An :class:`Option` is at the same time

- a parameter of the models' ``config.pbtxt`` that name it (``tensorrt_llm``'s
  ``parameters`` block is rendered from this table, :func:`parameters_pbtxt`;
  the other models' templates take a ``${name}`` placeholder),
- a flag of ``trillm serve`` and ``trillm render`` (:func:`add_arguments`),
- a field of ``trillm.serve.ServeConfig``, of ``tensorrt_llm``'s
  ``EngineHostParams`` where that model takes it, and of ``EngineConfig`` for
  the engine's own (:func:`option_fields`),
- one rule, checked in each of them with the same words (:meth:`Option.problem`),
- a row of README's "Configuration" table (``python -m trillm.options --markdown``
  prints it, ``--write-readme`` puts it in place; a unit test compares the two).

So a new option is one entry of :data:`OPTIONS`. Import-light (no torch):
the CLI, the renderer and every Triton stub read it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# "auto": the fastest correct precision on this CPU, per matmul, measured at load (trillm.engine.precision).
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Weight-only quantisation of every linear and the LM head (trillm.engine.quant).
QUANTIZATIONS = ("none", "int8", "int4")
QUANT_GROUP_SIZES = (32, 64, 128)
ENGINE_KINDS = ("torch", "tensorrt_llm")

TENSORRT_LLM = "tensorrt_llm"
PREPROCESSING = "preprocessing"
POSTPROCESSING = "postprocessing"
EVERY_MODEL = "all"  # a setting of every model's config.pbtxt (max_batch_size), not a parameter
# Models whose config.pbtxt takes its parameters as one rendered block, ${<model>_parameters}.
RENDERED_MODELS = (TENSORRT_LLM,)
_SHORT = {PREPROCESSING: "pre", POSTPROCESSING: "post"}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of an option that has none


@dataclass(frozen=True)
class Option:
    name: str  # the parameter's key and every dataclass field's name
    kind: type  # str, int, bool, or Path (a string parameter; ServeConfig holds and resolves it)
    default: Any  # what the models and the engine take when it is not set
    help: str  # Markdown: README's "meaning" column, and (as plain text) the flag's help
    models: tuple[str, ...] = (TENSORRT_LLM,)
    flag: str | None = ""  # "" = --<name with dashes>; None = no flag. A bool's flag flips its default.
    choices: tuple = ()
    minimum: int | None = None
    maximum: int | None = None
    zero_derives: bool = False  # 0 = derive (from the checkpoint or the machine)
    shown_default: str = ""  # README's default column, where the value alone does not say what it means
    engine: bool = False  # a field of trillm.engine.EngineConfig
    # A version's parameters.json template may take ${<name>_v<N>}, filled per version: the two paths,
    # from trillm serve --version-checkpoint (trillm.versions.VERSION_PLACEHOLDER).
    per_version: bool = False

    @property
    def flag_name(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.flag == "" else self.flag

    @property
    def rule(self) -> str:
        """The rule a value must follow, in the words every error uses ("" for any string)."""
        if self.choices:
            return f"must be one of {self.choices}"
        if self.kind is bool:
            return "must be a bool"
        if self.kind is int:
            if self.minimum is not None and self.maximum is not None:
                return f"must be an integer in [{self.minimum}, {self.maximum}]"
            if self.minimum is not None:
                return f"must be an integer >= {self.minimum}" + (" (0 = derive)" if self.zero_derives else "")
            return "must be an integer"
        return ""

    def problem(self, value: Any) -> str | None:
        """``"<rule>, got <value>"`` when ``value`` breaks the rule, else None."""
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and (self.minimum is None or value >= self.minimum)
            ok = ok and (self.maximum is None or value <= self.maximum)
        elif self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is str:
            ok = isinstance(value, str)
        else:
            ok = True
        if ok and self.choices:
            ok = value in self.choices
        return None if ok else f"{self.rule}, got {value!r}"

    @property
    def placeholder(self) -> bool:
        """Whether a template takes this option as ``${name}`` (a model whose parameters are not rendered)."""
        return any(model not in RENDERED_MODELS for model in self.models)


OPTIONS: tuple[Option, ...] = (
    Option("checkpoint_dir", Path, REQUIRED, "local Hugging Face Llama-style checkpoint dir or llama.cpp `.gguf` "
           "file (converted once, cached)", flag="--checkpoint", per_version=True,
           shown_default="the demo model, built if missing (`make serve`: SmolLM2)"),
    Option("tokenizer_dir", Path, "", "dir with `tokenizer.json`", models=(PREPROCESSING, POSTPROCESSING, TENSORRT_LLM),
           flag="--tokenizer", per_version=True, shown_default="the checkpoint"),
    Option("engine_kind", str, "torch", "`torch` (CPU) or `tensorrt_llm` (GPU)", flag="--engine", choices=ENGINE_KINDS),
    Option("engine_dir", str, "", "TensorRT-LLM engine dir (`--engine tensorrt_llm`)"),
    Option("dtype", str, "auto", "torch engine precision: `auto` measures fp32 vs bf16 per matmul (and the KV cache) "
           "at load where the CPU has AMX/AVX512-BF16, else fp32; or `float32`/`bfloat16`/`float16` everywhere; "
           "shown in `stats()[\"precision\"]`", choices=DTYPES, engine=True),
    Option("quantization", str, "none", "`int8` (per channel) or `int4` (per group): weight-only, every linear and "
           "the LM head, quantised at load and cached in `build/quant` "
           "([benchmarks](docs/benchmarks.md#quantisation))", choices=QUANTIZATIONS, engine=True),
    # 32: llama.cpp's Q4_0/Q4_1 block, and the one size that divides every Llama hidden size (SmolLM2's 576 is
    # not a multiple of 128); 64 is a little faster and less exact (docs/benchmarks.md "Quantisation").
    Option("quant_group_size", int, 32, "int4: inputs per scale and zero: 32 (llama.cpp's Q4 block), 64 or 128",
           choices=QUANT_GROUP_SIZES, engine=True),
    Option("max_model_len", int, 0, "prompt + generated tokens", models=(PREPROCESSING, TENSORRT_LLM), minimum=0,
           zero_derives=True, shown_default="min(max_position_embeddings, 4096)", engine=True),
    Option("max_input_len", int, 0, "longest prompt", models=(PREPROCESSING,), minimum=0,
           shown_default="max_model_len − 1"),
    Option("max_num_seqs", int, 0, "sequences batched together", minimum=0, zero_derives=True,
           shown_default="derived", engine=True),
    Option("max_num_batched_tokens", int, 0, "tokens per engine step (prefill chunk budget)", minimum=0,
           zero_derives=True, shown_default="derived", engine=True),
    Option("kv_cache_blocks", int, 0, "KV cache size in blocks", minimum=0, zero_derives=True,
           shown_default="derived from RAM", engine=True),
    Option("block_size", int, 16, "tokens per KV block", minimum=1, maximum=1024, engine=True),
    Option("num_threads", int, 0, "torch intra-op threads", minimum=0, zero_derives=True,
           shown_default="torch default", engine=True),
    Option("enable_prefix_caching", bool, True, "reuse KV blocks of shared prompt prefixes",
           flag="--no-prefix-caching", engine=True),
    Option("default_exclude_input_in_output", bool, True, "leave the prompt out of the output when a request does "
           "not say (`exclude_input_in_output`)", flag="--echo-prompt"),
    Option("add_special_tokens", bool, True, "prepend BOS like the model was trained", models=(PREPROCESSING,),
           flag=None),
    Option("skip_special_tokens", bool, True, "leave special tokens out of the text",
           models=(POSTPROCESSING, TENSORRT_LLM), flag=None),
    Option("max_batch_size", int, 64, "Triton batch limit", models=(EVERY_MODEL,), minimum=1),
)
BY_NAME = {option.name: option for option in OPTIONS}
ENGINE_OPTIONS = tuple(o for o in OPTIONS if o.engine)


def model_options(model: str) -> tuple[Option, ...]:
    """The options ``model``'s config.pbtxt takes as parameters."""
    return tuple(o for o in OPTIONS if model in o.models)


# -- dataclass fields ---------------------------------------------------------------

def option_fields(options: Iterable[Option]) -> Callable[[type], type]:
    """A class decorator, applied below ``@dataclass``: one field per option, after the class's own.

    A Path option's field is a ``str``, what a string parameter holds.
    """
    def add(cls: type) -> type:
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for option in options:
            annotations[option.name] = str if option.kind is Path else option.kind
            if option.default is not REQUIRED:
                setattr(cls, option.name, option.default)
        cls.__annotations__ = annotations
        return cls

    return add


def first_problem(obj: object, options: Iterable[Option]) -> tuple[str, str] | None:
    """(name, "<rule>, got <value>") of the first option whose field of ``obj`` breaks its rule."""
    for option in options:
        problem = option.problem(getattr(obj, option.name))
        if problem:
            return option.name, problem
    return None


# -- config.pbtxt ---------------------------------------------------------------------

def pbtxt_value(value: object) -> str:
    """A value as a config.pbtxt string parameter (booleans as true/false, as the parser reads them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parameters_pbtxt(model: str, values: dict[str, object]) -> str:
    """``model``'s ``parameters`` entries, one per option it takes, from ``values`` (by option name)."""
    return "\n".join(
        f'parameters {{\n  key: "{o.name}"\n  value: {{ string_value: "{pbtxt_value(values[o.name])}" }}\n}}'
        for o in model_options(model)
    )


# -- command line ---------------------------------------------------------------------

def plain(text: str) -> str:
    """Markdown help as terminal text: links as where they point, no backticks."""
    return re.sub(r"\[[^\]]+\]\(([^)]+)\)", r"\1", text).replace("`", "")


def _typed(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = option.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option.rule}, got {text!r}") from None
        problem = option.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = option.kind.__name__  # argparse names the type in its own messages
    return parse


def add_arguments(parser: argparse.ArgumentParser, options: Iterable[Option] = OPTIONS) -> None:
    """One flag per option that has one; ``dest`` is the option's name.

    A Path option defaults to None (ServeConfig says what that means); a bool's
    flag sets the opposite of its default.
    """
    for option in options:
        if option.flag_name is None:
            continue
        text = plain(option.help)
        if option.kind is bool:
            state = "on" if option.default else "off"
            parser.add_argument(option.flag_name, dest=option.name, default=option.default,
                                action="store_false" if option.default else "store_true",
                                help=f"turn {option.name} {'off' if option.default else 'on'} "
                                f"(default {state}): {text}")
            continue
        shown = plain(_shown_default(option))
        text = f"{text} (default: {shown})" if shown else text
        if option.kind is Path:
            parser.add_argument(option.flag_name, dest=option.name, type=Path, default=None, metavar="PATH",
                                help=text)
        elif option.choices:
            parser.add_argument(option.flag_name, dest=option.name, type=option.kind, choices=option.choices,
                                default=option.default, help=text)
        else:
            parser.add_argument(option.flag_name, dest=option.name, type=_typed(option), default=option.default,
                                help=text)


# -- README ---------------------------------------------------------------------------

README_BEGIN = "<!-- options: generated by `python -m trillm.options --write-readme`; edit trillm/options.py -->"
README_END = "<!-- end of options -->"


def _shown_default(option: Option) -> str:
    if option.shown_default:
        return option.shown_default
    if option.kind is bool:
        return pbtxt_value(option.default)
    if option.kind is str:
        return f"`{option.default}`" if option.default else ""
    return str(option.default)


def markdown_table() -> str:
    """README's table of options."""
    rows = ["| parameter (model) | flag | default | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        models = ", ".join(_SHORT.get(m, m) for m in o.models)
        flag = f"`{o.flag_name}`" if o.flag_name else ""
        cells = [f"`{o.name}` ({models})", flag, _shown_default(o), o.help]
        rows.append(" ".join(["|", " | ".join(cells), "|"]).replace("|  |", "| |"))
    return "\n".join(rows)


def _section_bounds(text: str) -> tuple[int, int]:
    try:
        start = text.index(README_BEGIN) + len(README_BEGIN)
        return start, text.index(README_END, start)
    except ValueError:
        raise ValueError(f"no options section: the lines {README_BEGIN!r} and {README_END!r}") from None


def readme_section(text: str) -> str:
    """What a README holds between the markers."""
    start, end = _section_bounds(text)
    return text[start:end].strip("\n")


def with_readme_section(text: str) -> str:
    """``text`` with the generated table between the markers."""
    start, end = _section_bounds(text)
    return f"{text[:start]}\n{markdown_table()}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trillm.options", description="The table of options.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print README's table of options")
    what.add_argument("--write-readme", type=Path, nargs="?", const=Path("README.md"), metavar="PATH",
                      help="rewrite the table in PATH (default README.md) between its markers")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    text = args.write_readme.read_text()
    args.write_readme.write_text(with_readme_section(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
