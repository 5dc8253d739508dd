"""The package's import graph (every import statement, deferred ones included, read with ast): no
cycle between modules, and nothing below training/ imports it (docs/design.md: config/, model/,
parallel/, data/, checkpoint/, pipeline/ never import training/)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "megatron_snm"
BELOW_TRAINING = ("config", "model", "parallel", "data", "checkpoint", "pipeline", "tensor_parallel")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}. `from megatron_snm.x import y` counts as importing
    megatron_snm.x.y where that is a module, else megatron_snm.x."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                            for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "megatron_snm.checkpoint.save_load" in graph and graph["megatron_snm.checkpoint.save_load"]  # it read them
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_below_training_imports_it():
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                    if module.split(".")[1:2] and module.split(".")[1] in BELOW_TRAINING
                    for target in targets if target.startswith("megatron_snm.training"))
    assert upward == []


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
