"""
The architecture, stated as tests: the tutorial's modules import no research extra, no module takes
part in an import cycle, and the losses that the extras wrap around the core compute what they did
before the core and the extras were separated (commit 893fe46).

`uv run python tests/test_architecture.py` prints the import graph.
"""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helpers import compose_cfg  # noqa: E402

CORE = {"model", "ebm", "data"}  # the tutorial: readable, runnable and testable alone
# what the core may import besides itself: one-line errors (UserError)
CORE_MAY_IMPORT = CORE | {"util"}


def project_modules():
    """The project's modules: the .py files at the repository root."""
    return sorted(p.stem for p in REPO.glob("*.py"))


def imports_of(module, modules):
    """The project modules that `module` imports anywhere in its file (top level or inside a
    function: a late import is still an import)."""
    tree = ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(modules) - {module})


def import_graph():
    modules = project_modules()
    return {m: imports_of(m, modules) for m in modules}


def cycles(graph):
    """Every import cycle, each as the list of modules along it (depth-first search)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    return found


def test_core_imports_no_extra():
    """model.py, ebm.py and data.py import only each other and util.py, even inside functions."""
    graph = import_graph()
    assert CORE <= graph.keys()
    wrong = {m: sorted(set(graph[m]) - CORE_MAY_IMPORT) for m in CORE}
    assert not any(wrong.values()), wrong
    assert graph["util"] == [], graph["util"]  # util.py imports nothing of the project


def test_no_import_cycle():
    """No module of the project takes part in an import cycle."""
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    """The cycle check itself: a graph with a cycle is caught, one without is not."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


# --------------------------------------------------------------------------------------------------
# the losses and gradients of every mode, as at commit 893fe46 (float64, a small model)

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=16", "data.block_size=8",
         "data.batch_size=4"]
PERSISTENT = ["model.n_persistent=6"]
MODES = {
    "default": [],
    "mixture": ["model.energy=mixture"],
    "mixture_autograd": ["model.energy=mixture", "model.mixture_stopgrad=false"],
    "transformer": ["model.energy=transformer"],
    "ebt": ["preset=ebt"],
    "ebt_s2": ["preset=ebt_s2", "model.replay_size=6"],
    "cd": ["model.use_contrastive=true", "model.contrastive_type=cd"],
    "pcd": ["model.use_contrastive=true", "model.contrastive_type=pcd", *PERSISTENT],
    "fast_pcd": ["model.use_contrastive=true", "model.contrastive_type=fast_pcd", *PERSISTENT],
    "pcd_transformer": ["model.use_contrastive=true", "model.contrastive_type=pcd",
                        "model.energy=transformer", *PERSISTENT],
}
BEFORE = Path(__file__).parent / "fixtures" / "losses_893fe46.json"


def build(mode):
    """The mode's config, a float64 model, its replay state and three batches, all seeded."""
    import engine
    from contrastive import ReplayState, replay_windows
    from model import GPT

    cfg = compose_cfg("train", SMALL + MODES[mode])
    engine.check_config(cfg)
    V = 11
    cfg.model.vocab_size, cfg.model.block_size = V, cfg.data.block_size
    torch.manual_seed(0)
    model = GPT(cfg.model).double()
    state = ReplayState(cfg.model).double() if replay_windows(cfg.model) > 0 else None
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(V, (4, 8), generator=g), torch.randint(V, (4, 8), generator=g))
               for _ in range(3)]
    return cfg, model, state, batches


def record(mode, loss_terms):
    """Three training calls (the replay state carries over), the training loss's gradients
    (sum, a seeded projection and norm per parameter), then eval-mode terms with 1 and 3 starts.
    loss_terms(model, state, x, y) -> the terms of ebm.losses (or what wraps it)."""
    from ebm import total_loss

    cfg, model, state, batches = build(mode)
    out = {"train": [], "eval": [], "grads": {}}
    torch.manual_seed(2)
    for x, y in batches:
        terms = loss_terms(model, state, x, y)
        loss = total_loss(cfg.model, terms)
        loss.backward()
        sums = {k: float(v.detach().double().sum()) for k, v in terms.items()}
        out["train"].append(sums | {"loss": float(loss.detach())})
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if p.grad is None:
            out["grads"][name] = None
            continue
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        out["grads"][name] = [float(p.grad.sum()), float((p.grad * r).sum()), float(p.grad.norm())]
    model.eval()
    torch.manual_seed(4)
    for samples in (1, 3):
        model.config.think_samples = samples
        with torch.set_grad_enabled(cfg.model.energy == "transformer"):  # dE/dp needs autograd
            terms = loss_terms(model, None, *batches[0])
        out["eval"].append({k: float(v.detach().double().sum()) for k, v in terms.items()})
    return out


def assert_close(now, before, path=""):
    """Equal trees of floats, to float64 rounding (BLAS rounds differently by CPU)."""
    if isinstance(before, dict):
        assert now.keys() == before.keys(), path
        for k in before:
            assert_close(now[k], before[k], f"{path}/{k}")
    elif isinstance(before, list):
        assert len(now) == len(before), path
        for i, (a, b) in enumerate(zip(now, before)):
            assert_close(a, b, f"{path}[{i}]")
    elif before is None:
        assert now is None, path
    else:
        assert now == pytest.approx(before, rel=1e-8, abs=1e-12), path


@pytest.mark.parametrize("mode", list(MODES))
def test_losses_and_gradients_as_before_the_split(mode):
    """contrastive.losses (ebm.losses wrapped with replay and CD) gives every mode's loss terms and
    gradients of commit 893fe46, where one function did it all."""
    import contrastive

    before = json.loads(BEFORE.read_text())[mode]
    assert_close(record(mode, lambda m, s, x, y: contrastive.losses(m, x, y, s)), before)


@pytest.mark.parametrize("mode", ["default", "mixture", "transformer", "ebt"])
def test_core_losses_as_before_the_split(mode):
    """ebm.losses alone, for the modes that need no replay buffer nor contrastive term, gives the
    loss terms and gradients of commit 893fe46."""
    import ebm

    before = json.loads(BEFORE.read_text())[mode]
    assert_close(record(mode, lambda m, s, x, y: ebm.losses(m, x, y)), before)


if __name__ == "__main__":
    for module, imported in import_graph().items():
        print(f"{module:13s} -> {', '.join(imported) or '(nothing of the project)'}")
