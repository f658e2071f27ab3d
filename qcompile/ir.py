"""qcompile's own graph IR: Graph, Node, Value, with use-def kept by the IR itself.

Passes edit only through the methods here (Node.replace_input, Value.replace_all_uses_with,
Graph.add_node, Graph.remove_node), so use-def chains stay true; Graph.check() verifies them
and the pass manager runs it after every pass. networkx is used for graph algorithms through
Graph.to_networkx(), not as the storage format.

Node attributes are kept as onnx AttributeProto objects, so subgraph attributes of If / Loop /
Scan pass through untouched; the outer values a subgraph reads are recorded as the node's
implicit inputs, so removing or renaming them is refused like any other use.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import networkx as nx
import numpy as np
from onnx import AttributeProto, helper

from .qtypes import QParams, QuantSpec


@dataclass(frozen=True)
class Use:
    """One use of a value: input `index` of `node` (index -1: implicit use by a subgraph)."""

    node: "Node"
    index: int


@dataclass(eq=False)
class Value:
    """A tensor: graph input, initializer (const is set), or a node output."""

    name: str
    dtype: int | None = None  # onnx TensorProto element type
    shape: tuple | None = None  # ints for static dims, str for symbolic, None unknown
    const: np.ndarray | None = None
    producer: "Node | None" = None
    quant: QuantSpec | None = None  # what annotation decided
    qparams: QParams | None = None  # what calibration decided
    meta: dict = field(default_factory=dict)  # pass scratch space, never exported
    _uses: list[Use] = field(default_factory=list, repr=False)

    def uses(self) -> list[Use]:
        return list(self._uses)

    def consumers(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for use in self._uses:
            seen.setdefault(id(use.node), use.node)
        return list(seen.values())

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def replace_all_uses_with(self, new: "Value", *, except_nodes: Iterable["Node"] = ()) -> None:
        skip = {id(n) for n in except_nodes}
        for use in self.uses():
            if id(use.node) in skip or use.index < 0:
                continue
            use.node.replace_input(use.index, new)

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


class Node:
    """An operator. inputs is a read-only tuple (None marks an omitted optional input)."""

    def __init__(self, op_type: str, inputs: Iterable[Value | None], outputs: Iterable[Value],
                 attributes: Iterable[AttributeProto] = (), name: str = "", domain: str = "",
                 implicit_inputs: Iterable[Value] = ()):
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.attributes: dict[str, AttributeProto] = {a.name: a for a in attributes}
        self.meta: dict[str, Any] = {}
        self._inputs: list[Value | None] = []
        for value in inputs:
            self._inputs.append(value)
            if value is not None:
                value._uses.append(Use(self, len(self._inputs) - 1))
        self.implicit_inputs: tuple[Value, ...] = tuple(implicit_inputs)
        for value in self.implicit_inputs:
            value._uses.append(Use(self, -1))
        self.outputs: list[Value] = list(outputs)
        for value in self.outputs:
            value.producer = self

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    def input(self, index: int) -> Value | None:
        return self._inputs[index] if index < len(self._inputs) else None

    def replace_input(self, index: int, value: Value | None) -> None:
        old = self._inputs[index]
        if old is not None:
            old._uses.remove(Use(self, index))
        self._inputs[index] = value
        if value is not None:
            value._uses.append(Use(self, index))

    def set_input(self, index: int, value: Value | None) -> None:
        """Like replace_input, but may fill an omitted trailing optional input (e.g. a Conv bias)."""
        while len(self._inputs) <= index:
            self._inputs.append(None)
        self.replace_input(index, value)

    def _detach_inputs(self) -> None:
        for index, value in enumerate(self._inputs):
            if value is not None:
                value._uses.remove(Use(self, index))
        for value in self.implicit_inputs:
            value._uses.remove(Use(self, -1))
        self._inputs = []
        self.implicit_inputs = ()

    def attr(self, name: str, default: Any = None) -> Any:
        if name not in self.attributes:
            return default
        return helper.get_attribute_value(self.attributes[name])

    def set_attr(self, name: str, value: Any) -> None:
        self.attributes[name] = helper.make_attribute(name, value)

    @property
    def has_subgraph(self) -> bool:
        return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in self.attributes.values())

    def describe(self) -> str:
        """How error messages name a node: 'conv1' (Conv)."""
        return f"node '{self.name}' ({self.op_type})"

    def __repr__(self) -> str:
        return f"Node({self.op_type}, {self.name!r})"


class Graph:
    """A model: nodes in topological order, graph inputs/outputs, initializers, opsets."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.values: dict[str, Value] = {}
        self.opset_imports: dict[str, int] = {"": 13}
        self.model_props: dict[str, Any] = {}  # ir_version, producer, doc_string, metadata_props
        self._counter = itertools.count()

    # ---- creation -------------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        """A deterministic name not used yet: hint, hint_1, hint_2, ..."""
        if hint not in self.values:
            return hint
        for n in itertools.count(1):
            candidate = f"{hint}_{n}"
            if candidate not in self.values:
                return candidate
        raise AssertionError("unreachable")

    def add_value(self, name: str, *, dtype: int | None = None, shape: tuple | None = None,
                  const: np.ndarray | None = None, exact_name: bool = False) -> Value:
        if exact_name and name in self.values:
            raise ValueError(f"value name {name!r} already exists")
        value = Value(name if exact_name else self.fresh_name(name), dtype=dtype, shape=shape, const=const)
        self.values[value.name] = value
        return value

    def add_constant(self, hint: str, array: np.ndarray) -> Value:
        from onnx import helper as _h
        array = np.asarray(array)
        dtype = _h.np_dtype_to_tensor_dtype(array.dtype)
        return self.add_value(hint, dtype=dtype, shape=tuple(array.shape), const=array)

    def add_node(self, op_type: str, inputs: Iterable[Value | None], outputs: Iterable[Value] | int = 1, *,
                 name: str | None = None, attributes: dict[str, Any] | None = None, domain: str = "",
                 after: Node | None = None, before: Node | None = None) -> Node:
        """Create a node; outputs may be a count (fresh values named after the node).

        The node is placed after `after` / before `before` (default: at the end); the pass
        manager re-sorts topologically after each pass, so placement only keeps dumps readable.
        """
        node_name = self.fresh_node_name(name or op_type)
        if isinstance(outputs, int):
            outputs = [self.add_value(f"{node_name}_out{i}" if outputs > 1 else f"{node_name}_out")
                       for i in range(outputs)]
        attrs = [helper.make_attribute(k, v) for k, v in (attributes or {}).items()]
        node = Node(op_type, inputs, outputs, attrs, name=node_name, domain=domain)
        if after is not None:
            self.nodes.insert(self.nodes.index(after) + 1, node)
        elif before is not None:
            self.nodes.insert(self.nodes.index(before), node)
        else:
            self.nodes.append(node)
        return node

    def fresh_node_name(self, hint: str) -> str:
        names = {n.name for n in self.nodes}
        if hint not in names:
            return hint
        for n in itertools.count(1):
            if f"{hint}_{n}" not in names:
                return f"{hint}_{n}"
        raise AssertionError("unreachable")

    def rename_value(self, value: Value, new_name: str) -> None:
        if new_name in self.values:
            raise ValueError(f"value name {new_name!r} already exists")
        del self.values[value.name]
        value.name = new_name
        self.values[new_name] = value

    # ---- removal --------------------------------------------------------------------------
    def remove_node(self, node: Node, *, safe: bool = True) -> None:
        """Remove a node; with safe=True refuse when its outputs are still used."""
        if safe:
            for out in node.outputs:
                if out._uses or out in self.outputs:
                    raise ValueError(f"cannot remove {node.describe()}: output '{out.name}' is still used")
        node._detach_inputs()
        self.nodes.remove(node)
        for out in node.outputs:
            out.producer = None
            if not out._uses and out not in self.outputs:
                self.values.pop(out.name, None)

    def remove_unused(self) -> int:
        """Drop nodes whose outputs nobody uses and constants nobody reads; returns the count."""
        removed = 0
        changed = True
        while changed:
            changed = False
            for node in reversed(self.nodes):
                if all(not o._uses and o not in self.outputs for o in node.outputs):
                    self.remove_node(node)
                    removed += 1
                    changed = True
        for name, value in list(self.values.items()):
            if value.is_const and not value._uses and value not in self.outputs and value not in self.inputs:
                del self.values[name]
        return removed

    # ---- queries --------------------------------------------------------------------------
    def initializers(self) -> list[Value]:
        return [v for v in self.values.values() if v.is_const]

    def opset(self, domain: str = "") -> int:
        return self.opset_imports.get(domain, 0)

    def to_networkx(self) -> nx.DiGraph:
        """Node-level dependency graph (edges producer -> consumer), keyed by node object."""
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for node in self.nodes:
            for value in itertools.chain(node.inputs, node.implicit_inputs):
                if value is not None and value.producer is not None:
                    g.add_edge(value.producer, node)
        return g

    def toposort(self) -> None:
        """Re-order nodes topologically, keeping the current order where it is free."""
        position = {id(n): i for i, n in enumerate(self.nodes)}
        g = self.to_networkx()
        try:
            order = list(nx.lexicographical_topological_sort(g, key=lambda n: position[id(n)]))
        except nx.NetworkXUnfeasible as exc:
            cycle = nx.find_cycle(g)
            raise ValueError(f"graph has a cycle through {cycle[0][0].describe()}") from exc
        self.nodes = order

    def check(self) -> None:
        """Verify use-def, names and order; raises AssertionError describing the first problem."""
        names: set[str] = set()
        seen_outputs: set[int] = {id(v) for v in self.inputs} | {id(v) for v in self.values.values() if v.is_const}
        node_names: set[str] = set()
        for node in self.nodes:
            assert node.name not in node_names, f"duplicate node name '{node.name}'"
            node_names.add(node.name)
            for index, value in enumerate(node.inputs):
                if value is None:
                    continue
                assert Use(node, index) in value._uses, f"{node.describe()} input {index} missing from uses of '{value.name}'"
                assert self.values.get(value.name) is value, f"{node.describe()} reads unregistered value '{value.name}'"
                assert id(value) in seen_outputs, f"{node.describe()} reads '{value.name}' before it is produced"
            for value in node.implicit_inputs:
                assert self.values.get(value.name) is value, f"{node.describe()} subgraph reads unregistered '{value.name}'"
            for value in node.outputs:
                assert value.producer is node, f"'{value.name}' does not know its producer {node.describe()}"
                assert value.name not in names, f"value '{value.name}' produced twice"
                names.add(value.name)
                seen_outputs.add(id(value))
        for value in self.values.values():
            for use in value._uses:
                assert use.node in self.nodes, f"'{value.name}' is used by a removed {use.node.describe()}"
                if use.index >= 0:
                    assert use.node.inputs[use.index] is value, f"stale use of '{value.name}' in {use.node.describe()}"
        for value in self.outputs:
            assert id(value) in seen_outputs, f"graph output '{value.name}' is never produced"

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes))

    def dump(self) -> str:
        """Readable text form used by --dump-ir: one line per node, with quantization annotations."""
        def show(value: Value | None) -> str:
            if value is None:
                return "_"
            text = value.name
            if value.is_const:
                text += f"<const {list(value.const.shape)}>"
            if value.qparams is not None:
                s = value.qparams.summary()
                text += f"[q{s['bits']}{'s' if s['signed'] else 'u'} scale={s['scale']}]"
            elif value.quant is not None:
                text += f"[q{value.quant.bits}{'s' if value.quant.signed else 'u'}?]"
            return text

        lines = [f"graph {self.name} opsets={self.opset_imports}"]
        lines += [f"  input {show(v)} {v.shape}" for v in self.inputs]
        for node in self.nodes:
            outs = ", ".join(show(v) for v in node.outputs)
            ins = ", ".join(show(v) for v in node.inputs)
            lines.append(f"  {outs} = {node.op_type}[{node.name}]({ins})")
        lines += [f"  output {show(v)}" for v in self.outputs]
        return "\n".join(lines) + "\n"
