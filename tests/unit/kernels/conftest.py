"""Run the template's Triton kernels on CPU tensors through Triton's interpreter.

What has to happen before what (checked against triton 3.9's source and by experiment):
  * each `@triton.jit` decorator picks interpreter vs compiler from TRITON_INTERPRET when it runs;
  * that includes triton.language's own jit'd helpers (tl.sum, tl.max, ...), decorated when
    `triton.language` is first imported: interpreted kernels calling compiled helpers fail with
    "Cannot call @triton.jit'd outside of the scope of a kernel";
  * launches also read the variable (a lazy gluon import asserts on it), so it must stay set.
Hence: TRITON_INTERPRET=1 is set here, first, and left set for the session; the kernels are loaded as a
*private copy* of the package (own module name, FARM_KERNELS=interpret) so their decorators run now,
whatever other tests imported earlier. If triton.language was nevertheless imported before this file
by another test, this process cannot interpret kernels: the tests here are then skipped in-process and
test_kernels_dispatch.py::test_interpreter_suite_in_fresh_process reruns this folder in a subprocess.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
KERNELS_DIR = REPO / "training_template" / "kernels"
COPY_NAME = "_farm_kernels_interpreted"


def _interpreter_state() -> str:
    """"ok", "no-triton", or "tainted" (triton.language imported before TRITON_INTERPRET was set)."""
    try:
        import triton.language as tl
    except ImportError:
        return "no-triton"
    return "ok" if type(tl.sum).__name__ == "InterpretedFunction" else "tainted"


INTERPRETER_STATE = _interpreter_state()


def _load_interpreted_kernels():
    if COPY_NAME in sys.modules:
        return sys.modules[COPY_NAME]
    saved = os.environ.get("FARM_KERNELS")
    os.environ["FARM_KERNELS"] = "interpret"
    try:
        spec = importlib.util.spec_from_file_location(
            COPY_NAME, KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[COPY_NAME] = module
        spec.loader.exec_module(module)
    finally:  # FARM_KERNELS must not leak into other tests' imports of the template
        if saved is None:
            os.environ.pop("FARM_KERNELS", None)
        else:
            os.environ["FARM_KERNELS"] = saved
    return module


KERNELS = _load_interpreted_kernels() if INTERPRETER_STATE == "ok" else None


def pytest_collection_modifyitems(config, items):
    if INTERPRETER_STATE == "ok":
        return
    reason = ("triton is not installed: the Triton kernels cannot be interpreted" if INTERPRETER_STATE == "no-triton"
              else "triton.language was imported before TRITON_INTERPRET=1; "
                   "test_interpreter_suite_in_fresh_process reruns these tests in a subprocess")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents and not item.get_closest_marker("any_process"):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config):
    config.addinivalue_line("markers", "any_process: kernel test that does not need the interpreter in-process")


@pytest.fixture
def K():
    """The interpreted kernels package with kernels enabled (restored after each test)."""
    KERNELS.set_enabled(True)
    yield KERNELS
    KERNELS.set_enabled(True)

