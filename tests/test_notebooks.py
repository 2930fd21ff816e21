"""The notebooks in notebooks/: they run, they import the math instead of copying it, and they are
committed with their outputs.

CI runs each notebook top to bottom in quick mode (SAPO_NB_QUICK=1 shrinks step counts and sample sizes;
the notebooks read it in their parameters cell), with cwd = notebooks/, like a reader would.

Re-run them and save their outputs in place (normal mode, what gets committed; a few CPU minutes each):
    python tests/test_notebooks.py --write                  # all five
    python tests/test_notebooks.py --write 03                # one
"""
import argparse
import ast
import inspect
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_preference_losses.ipynb", "02_self_augmented_negatives.ipynb", "03_end_to_end.ipynb",
             "04_evidence.ipynb", "05_repairs.ipynb"]
CELL_TIMEOUT_S = 600
MAX_COMMITTED_BYTES = 1_000_000


def read(name: str):
    import nbformat
    return nbformat.read(NB_DIR / name, as_version=4)


def execute(nb, quick: bool, kernel_dir: Path, timeout: int = CELL_TIMEOUT_S):
    """Run every cell of `nb` in place with a fresh kernel of *this* interpreter, cwd = notebooks/.
    Raises nbclient's CellExecutionError on the first cell that errors."""
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient
    # A kernel spec pointing at sys.executable, first on JUPYTER_PATH: a user-level "python3" spec
    # for some other interpreter (without torch) must not shadow the one we are testing with.
    write_kernel_spec(kernel_dir / "kernels" / "python3")
    # One intra-op thread unless told otherwise: the models are small, and on a shared or oversubscribed
    # machine OpenMP threads that wait for each other made generation 10x slower than a single thread.
    env = {"JUPYTER_PATH": str(kernel_dir), "SAPO_NB_QUICK": "1" if quick else "0",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(NB_DIR)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def code_sources(nb) -> str:
    """The code cells as one Python module; IPython magics and shell lines are dropped."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines += [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


GUARDED = ("sapo", "sapo_fast", "sapo_utils.cli", "sapo_utils.data", "sapo_utils.models", "sapo_utils.report",
           "sapo_utils.run", "sapo_utils.checkpoints", "sapo_utils.optim", "sapo_utils.evaluation",
           "tasks.ifeval_lite", "tasks.arithmetic")   # the algorithm, its speed-ups, its plumbing, the tasks


def sapo_names() -> set[str]:
    """Functions and classes defined in the guarded modules (what a notebook must import, not copy)."""
    import importlib
    sys.path.insert(0, str(ROOT))
    names = set()
    for module in GUARDED:
        mod = importlib.import_module(module)
        names |= {n for n, obj in vars(mod).items() if (inspect.isfunction(obj) or inspect.isclass(obj))
                  and getattr(obj, "__module__", None) == module and not n.startswith("_")}
    return names


# ----------------------------------------------------------------------------- static checks (fast)

def redefinitions(source: str) -> set[str]:
    """Names from sapo.py that `source` defines itself (def, class, or name = lambda)."""
    tree = ast.parse(source)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
                for t in n.targets if isinstance(t, ast.Name)}
    return defined & sapo_names()


def test_redefinition_check_catches_copies():
    source = ("def dpo_loss(a, b):\n    return a - b\nclass ReplayBuffer:\n    pass\nema_update = lambda e, p, d: None\n"
              "def show(x): pass\ndef load_model(n): pass\ndef check_loose(r, c): pass")
    assert redefinitions(source) == {"dpo_loss", "ReplayBuffer", "ema_update", "load_model", "check_loose"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_imports_sapo_and_redefines_none_of_it(name):
    """Notebooks import the algorithm; a copy of dpo_loss, ema_update, ReplayBuffer... would drift."""
    source = code_sources(read(name))
    tree = ast.parse(source)
    imported = any(isinstance(n, ast.Import) and any(a.name == "sapo" for a in n.names) or
                   isinstance(n, ast.ImportFrom) and n.module == "sapo" for n in ast.walk(tree))
    assert imported, f"{name} does not import sapo"
    copies = redefinitions(source)
    assert not copies, f"{name} re-defines {sorted(copies)} from sapo.py: import them instead"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs(name):
    """Readable on GitHub: run top to bottom in one go, no errors, plots embedded, small enough."""
    nb = read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: not executed top to bottom in one run: {counts}"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}: committed with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no plot in the committed outputs"
    size = (NB_DIR / name).stat().st_size
    assert size < MAX_COMMITTED_BYTES, f"{name}: {size} bytes committed"


# ----------------------------------------------------------------------------- execution (quick mode)

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    """Every cell runs without an error in quick mode (SAPO_NB_QUICK=1)."""
    nb = execute(read(name), quick=True, kernel_dir=tmp_path)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


# ----------------------------------------------------------------------------- re-run and save

def main(argv=None) -> int:
    import tempfile
    import nbformat
    parser = argparse.ArgumentParser(description="Execute the notebooks (normal mode) and save them with their outputs.")
    parser.add_argument("--write", action="store_true", help="save the executed notebooks in place")
    parser.add_argument("--quick", action="store_true", help="SAPO_NB_QUICK=1 (never combine with --write)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (a busy machine is slow)")
    parser.add_argument("names", nargs="*", help="notebook names or their starts, e.g. 03 (default: all)")
    args = parser.parse_args(argv)
    if args.write and args.quick:
        parser.error("commit normal-mode outputs: --write without --quick")
    names = [n for n in NOTEBOOKS if not args.names or any(n.startswith(a) for a in args.names)]
    for name in names:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as kd:
            nb = execute(read(name), quick=args.quick, kernel_dir=Path(kd), timeout=args.timeout)
        print(f"{name}: ran in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.write:
            nbformat.write(nb, NB_DIR / name)
            print(f"  wrote {NB_DIR / name} ({(NB_DIR / name).stat().st_size / 1e3:.0f} kB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
