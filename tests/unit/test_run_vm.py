"""The VM runner's summary: CI shows only the tail of a long log, so each failure's
assertion lines must be repeated there."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("run_vm", Path(__file__).parents[2] / "testbed" / "run_vm.py")
run_vm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_vm)

LOG = """\
tests/kernel/test_a.py::test_ok PASSED [ 33%]
tests/kernel/test_a.py::test_bad[fd90::1] FAILED [ 66%]
tests/kernel/test_b.py::test_broken_fixture ERROR [100%]
==================================== ERRORS ====================================
___________________ ERROR at setup of test_broken_fixture ______________________
    def topo():
>       raise RuntimeError("no veth")
E       RuntimeError: no veth
=================================== FAILURES ===================================
_ test_bad[fd90::1] _
    def test_bad(vip):
>       assert ports() == {"a": True}
E       AssertionError: assert {'a': False} == {'a': True}
E         Differing items:
----------------------------- Captured stdout call -----------------------------
E  this is the test's own output, not pytest's
==================================== PASSES ====================================
___________________________________ test_ok ____________________________________
E       not a failure: a passing test's captured output
=========================== short test summary info ============================
PASSED tests/kernel/test_a.py::test_ok
FAILED tests/kernel/test_a.py::test_bad[fd90::1] - AssertionError: assert {'a...
ERROR tests/kernel/test_b.py::test_broken_fixture - RuntimeError: no veth
"""


def test_each_failure_is_followed_by_its_assertion_lines():
    assert run_vm.failure_lines(LOG) == [
        "FAILED tests/kernel/test_a.py::test_bad[fd90::1] - AssertionError: assert {'a...",
        "  E       AssertionError: assert {'a': False} == {'a': True}",
        "  E         Differing items:",
        "ERROR tests/kernel/test_b.py::test_broken_fixture - RuntimeError: no veth",
        "  E       RuntimeError: no veth",
    ]


def test_the_assertion_lines_per_failure_are_capped():
    many = LOG.replace("E         Differing items:\n", "E         more\n" * 50)
    lines = run_vm.failure_lines(many, per_failure=3)
    assert len([line for line in lines if line.startswith("  E")]) == 3 + 1
