"""tools/plant_bugs.py's bookkeeping, without running any suite: a pytest run that could not collect the
tests is an error, not a catch; the unmodified copy runs the same tests first and, failing, counts nothing."""
import os
import sys

import pytest

from tests.server_utils import ROOT
from tools import plant_bugs
from tools.plant_bugs import BUGS, CANARY, Bug, related_tests, selection, verdict

COLLECTION_ERROR = """
==================================== ERRORS ====================================
_____________________ ERROR collecting tests/test_moe.py _____________________
E   SyntaxError: invalid syntax
=========================== short test summary info ============================
ERROR tests/test_moe.py
!!!!!!!!!!!!!!!!!!!! Interrupted: 1 error during collection !!!!!!!!!!!!!!!!!!!!
1 error in 3.10s
"""


@pytest.mark.parametrize("rc, output, kind", [
    (1, "FAILED tests/test_moe.py::test_x - assert 1 == 2\n1 failed, 3 passed", "caught"),
    (1, "ERROR tests/test_x.py::test_y - RuntimeError: the server died\n1 error", "caught"),  # a fixture broke
    (0, "4 passed", "missed"),
    (5, "no tests ran", "missed"),
    (2, COLLECTION_ERROR, "error"),
    (1, COLLECTION_ERROR, "error"),  # as with --continue-on-collection-errors
    (4, "ImportError while loading conftest '/tmp/x/tests/conftest.py'.", "error"),
    (3, "INTERNALERROR> Traceback", "error"),
    (-9, "", "error"),
])
def test_a_run_that_could_not_collect_the_tests_is_an_error_not_a_catch(rc, output, kind):
    got, text = verdict(rc, output)
    assert got == kind
    assert text.startswith({"caught": "caught", "missed": ("MISSED", "no tests ran"), "error": "ERROR"}[kind])


def test_the_selection_runs_each_test_once():
    bugs = [Bug("x", "", "", "", "", ["tests/test_moe.py", "tests/test_ops.py::test_a"]),
            Bug("y", "", "", "", "", ["tests/test_ops.py", "tests/test_moe.py", "tests/test_gone.py"]),
            Bug("z", "", "", "", "", ["tests/test_gateway.py::test_b"])]
    assert related_tests(ROOT, bugs[1]) == ["tests/test_ops.py", "tests/test_moe.py"]
    assert selection(ROOT, bugs) == ["tests/test_moe.py", "tests/test_ops.py", "tests/test_gateway.py::test_b"]


def test_every_bug_names_tests_that_exist():
    for bug in [CANARY, *BUGS]:
        assert related_tests(ROOT, bug) == bug.tests, bug.key


@pytest.fixture
def planted(monkeypatch, tmp_path):
    """main() on bug c against a stand-in copy (the patched files and the test files exist) and a
    stand-in pytest whose (rc, output) per run the test sets; returns the files each run was given."""
    bug = next(b for b in BUGS if b.key == "c")

    def copy_tree(dest):
        for b in (CANARY, bug):
            os.makedirs(os.path.dirname(os.path.join(dest, b.path)), exist_ok=True)
            with open(os.path.join(dest, b.path), "w") as f:
                f.write(b.old)
            for t in b.tests:
                os.makedirs(os.path.join(dest, "tests"), exist_ok=True)
                open(os.path.join(dest, t.split("::")[0]), "w").close()

    runs, answers = [], []

    def run_tests(copy, files):
        runs.append(files)
        rc, output = answers.pop(0)
        return rc, output, [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))], 0.0

    monkeypatch.setattr(plant_bugs, "copy_tree", copy_tree)
    monkeypatch.setattr(plant_bugs, "check_imports_copy", lambda copy: None)
    monkeypatch.setattr(plant_bugs, "run_tests", run_tests)
    monkeypatch.setattr(sys, "argv", ["plant_bugs.py", "--only", "c"])
    return runs, answers


def test_a_failing_baseline_counts_nothing(planted, capsys):
    runs, answers = planted
    answers.append((1, "FAILED tests/test_cancellation.py::test_x - assert 0"))
    assert plant_bugs.main() == 2
    assert runs == [["tests/test_validation.py", "tests/test_cancellation.py"]]  # the canary's and the bug's
    out = capsys.readouterr().out
    assert "nothing counted" in out and "bugs caught" not in out


def test_a_collection_error_is_reported_as_an_error(planted, capsys):
    runs, answers = planted
    answers += [(0, "9 passed"), (4, "ImportError while loading conftest"), (2, COLLECTION_ERROR)]
    assert plant_bugs.main() == 1
    assert runs == [["tests/test_validation.py", "tests/test_cancellation.py"], ["tests/test_validation.py"],
                    ["tests/test_cancellation.py"]]
    out = capsys.readouterr().out
    assert "the canary was not caught" not in out  # a package that does not import breaks the tests: as meant
    assert "[c] " in out and "ERROR: the tests could not be collected" in out
    assert "0/1 bugs caught; the tests could not run (errors, not catches): ['c']" in out


def test_a_caught_bug_still_counts(planted, capsys):
    runs, answers = planted
    answers += [(0, "9 passed"), (2, COLLECTION_ERROR), (1, "FAILED tests/test_cancellation.py::test_x - assert 0")]
    assert plant_bugs.main() == 0
    assert "1/1 bugs caught" in capsys.readouterr().out


def test_the_canarys_patch_applies():
    """Without the canary nothing the script reports means anything: its anchor must stay in the package."""
    with open(os.path.join(ROOT, CANARY.path)) as f:
        assert f.read().count(CANARY.old) == 1


def test_every_bugs_patch_applies():
    """A bug whose anchor moved is reported as "patch did not apply" only when the script runs: each
    anchor must occur exactly once in its file, as for the canary."""
    for bug in BUGS:
        with open(os.path.join(ROOT, bug.path)) as f:
            assert f.read().count(bug.old) == 1, f"{bug.key}: its anchor is not found exactly once in {bug.path}"
