"""Passes and the pass manager.

A pass is a class registered by name (its recipe key) with a pydantic ``Options`` model, a
declared ``phase``, the facts it ``requires`` and ``establishes``, and ``run(graph, ctx)``
returning a PassResult. It never reads files, parses YAML or prints: data arrives through
the PassContext, and everything it has to say goes to ``ctx.note`` (the report) or its logger.

The manager checks the whole pipeline before running anything (phase order, requirements),
runs the passes in the recipe's order — no pass is skipped or inserted — times each one,
verifies the IR after each, and hands the graph to instruments (e.g. --dump-ir).
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Protocol

from pydantic import BaseModel, ConfigDict

from .errors import PassError, QCompileError, RecipeError
from .ir import Graph

logger = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    """Where a pass may stand in a pipeline; phases never go backwards."""

    TRANSFORM = 1  # float-equivalent rewrites (fold_batchnorm, equalize_cross_layer, ...)
    ANNOTATE = 2  # decide what is quantized and how
    CALIBRATE = 3  # statistics -> ranges
    REFINE = 4  # change ranges or weights using the ranges (aciq_clip, correct_bias, ...)
    LOWER = 5  # emit quantization ops (insert_qdq, fuse_requant)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)




@dataclass
class PassContext:
    """What a pass may read besides the graph. Built by the caller (CLI, tests, API)."""

    scheme: Any = None  # recipe.Quantization: the tensor-class quantization settings
    calibration: Any = None  # data.DataSource (picklable, so worker processes can read shards)
    calibration_batches: int = 0  # for progress bars
    jobs: int = 1  # processes for statistics collection
    memory_budget_mb: int = 512  # bytes of exposed activations per batch and session
    progress: Callable[[Iterable, int, str], Iterable] = lambda it, total, desc: it
    notes: dict[str, list] = field(default_factory=dict)

    def note(self, section: str, item: Any) -> None:
        """Record something for the report (e.g. 'float_nodes': {node, op, reason})."""
        self.notes.setdefault(section, []).append(item)

    def require_calibration(self, pass_name: str):
        if self.calibration is None:
            raise QCompileError(f"[{pass_name}] needs calibration data; pass --calib DATA")
        return self.calibration


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement run()."""

    name: ClassVar[str] = ""  # set by @register_pass
    phase: ClassVar[Phase] = Phase.TRANSFORM
    Options: ClassVar[type[BaseModel]] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    establishes: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class Instrument(Protocol):
    def after_pass(self, index: int, pass_: Pass, graph: Graph, result: PassResult) -> None: ...


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]


def check_pipeline(passes: list[Pass], where: str = "recipe") -> None:
    """Refuse a pipeline whose phases go backwards or whose requirements are not met first."""
    facts: set[str] = set()
    previous: Pass | None = None
    for index, pass_ in enumerate(passes):
        if previous is not None and pass_.phase < previous.phase:
            raise RecipeError(
                f"{where}: passes[{index}]: '{pass_.name}' ({pass_.phase.name.lower()} phase) cannot run after "
                f"'{previous.name}' ({previous.phase.name.lower()} phase); phases run in the order "
                + " < ".join(p.name.lower() for p in Phase))
        missing = sorted(pass_.requires - facts)
        if missing:
            from .registry import PASSES

            providers = sorted(name for name in PASSES.names() if set(missing) & PASSES.get(name).establishes)
            fix = f"add {' or '.join(repr(p) for p in providers)} before it" if providers else \
                "no registered pass establishes it"
            raise RecipeError(f"{where}: passes[{index}]: '{pass_.name}' requires "
                              f"{', '.join(repr(m) for m in missing)}, which no earlier pass establishes; {fix}")
        facts |= pass_.establishes
        previous = pass_


class PassManager:
    def __init__(self, passes: list[Pass], instruments: Iterable[Instrument] = (), verify: bool = True):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify = verify
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        check_pipeline(self.passes)
        for index, pass_ in enumerate(self.passes):
            start = time.perf_counter()
            try:
                result = pass_.run(graph, ctx)
            except QCompileError as exc:
                if isinstance(exc, PassError) or str(exc).startswith(f"[{pass_.name}]"):
                    raise
                raise type(exc)(f"[{pass_.name}] {exc}") from exc
            except Exception as exc:
                ran = ", ".join(p.name for p in self.passes[:index]) or "none"
                raise RuntimeError(f"pass '{pass_.name}' crashed (passes run before it: {ran}): "
                                   f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(result, PassResult):
                raise TypeError(f"pass '{pass_.name}' returned {type(result).__name__}; a pass must return PassResult")
            graph.toposort()
            if self.verify:
                try:
                    graph.check()
                except AssertionError as exc:
                    raise RuntimeError(f"pass '{pass_.name}' left the IR inconsistent: {exc}") from exc
            record = PassRecord(pass_.name, time.perf_counter() - start, result.modified, result.stats)
            self.records.append(record)
            logger.info("pass %s: %.3fs modified=%s %s", pass_.name, record.seconds, result.modified, result.stats)
            for instrument in self.instruments:
                instrument.after_pass(index, pass_, graph, result)
        return graph


class DumpIR:
    """Instrument for --dump-ir DIR: writes the IR as text after each pass."""

    def __init__(self, directory):
        from pathlib import Path
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def before(self, graph: Graph) -> None:
        (self.directory / "00_input.txt").write_text(graph.dump())

    def after_pass(self, index: int, pass_: Pass, graph: Graph, result: PassResult) -> None:
        (self.directory / f"{index + 1:02d}_{pass_.name}.txt").write_text(graph.dump())
