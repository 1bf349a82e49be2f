"""The package's layout: Meta's import paths, and imports that run one way."""

import ast
import importlib
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "llama"

# Every public name of Meta's two repositories, at Meta's module path.
META_NAMES = {
    # Llama 3 (meta-llama/llama3)
    "llama": ["Llama", "Dialog", "ModelArgs", "Transformer", "Tokenizer"],
    "llama.generation": ["Llama", "CompletionPrediction", "ChatPrediction", "sample_top_p"],
    "llama.tokenizer": ["Tokenizer", "ChatFormat", "Dialog", "Message", "Role"],
    "llama.model": [
        "ModelArgs", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "Transformer", "precompute_freqs_cis",
        "reshape_for_broadcast", "apply_rotary_emb", "repeat_kv", "apply_scaling",
    ],
    # Llama 2 (meta-llama/llama): its generation.py holds the chat tags and types
    "llama.generation ": [
        "Llama", "Dialog", "Message", "Role", "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS", "UNSAFE_ERROR",
        "CompletionPrediction", "ChatPrediction", "sample_top_p",
    ],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(META_NAMES))
def test_meta_names_import_from_meta_paths(module):
    loaded = importlib.import_module(module.strip())
    missing = [name for name in META_NAMES[module] if not hasattr(loaded, name)]
    assert not missing, f"{module.strip()} lacks {missing}"


def test_llama3_test_suite_first_import():
    from llama.tokenizer import ChatFormat, Tokenizer

    assert ChatFormat.__name__ == "ChatFormat" and Tokenizer.__name__ == "Tokenizer"


def test_repeat_kv_repeats_each_head_for_its_query_heads():
    from llama.model import repeat_kv

    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    y = repeat_kv(x, 3)
    assert y.shape == (2, 3, 6, 4)
    assert torch.equal(y[:, :, 0:3], x[:, :, 0:1].expand(2, 3, 3, 4))
    assert torch.equal(y[:, :, 3:6], x[:, :, 1:2].expand(2, 3, 3, 4))
    assert repeat_kv(x, 1) is x


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(node: ast.AST, modules: Dict[str, Path]) -> List[str]:
    """The package modules an import statement loads (a submodule where `from X import name` names one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        return subs or [node.module]
    return []


def _imports(top_level: bool) -> Dict[str, Set[str]]:
    """module -> package modules it imports at its top level (top_level) or inside functions (not)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level else [
            n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        ]
        graph[name] = {t for n in nodes for t in _target(n, modules) if t != name}
    return graph


def test_package_imports_have_no_cycle():
    graph = _imports(top_level=True)
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_package_import_is_hidden_inside_a_function():
    hidden = {m: sorted(deps) for m, deps in _imports(top_level=False).items() if deps}
    assert not hidden, f"imports inside functions: {hidden}"


@pytest.mark.parametrize("lower", ["llama.args", "llama.model", "llama.tokenizer", "llama.chat_format", "llama.checkpoints.meta"])
def test_lower_layers_do_not_import_generation_or_programs(lower):
    deps = _imports(top_level=True)[lower]
    upward = [d for d in deps if d in ("llama", "llama.generation") or d.startswith("llama.cli")]
    assert not upward, f"{lower} imports {upward}"


def test_args_imports_nothing_from_the_package():
    assert _imports(top_level=True)["llama.args"] == set()
