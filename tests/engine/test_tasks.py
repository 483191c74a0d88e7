"""The Task interface: what differs between classification and detection lives in engine/tasks.py; the Trainer
and `robustlab eval` ask the task and branch on nothing."""
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from robustlab.engine.tasks import Classification, Detection, Task, task_of
from robustlab.registry import TASKS

SRC = Path(__file__).resolve().parents[2] / "src" / "robustlab"


def _task_comparisons(path: Path) -> list[str]:
    """Branches on which task it is: a comparison of something that reads a task against a string (`if self.task ==
    "detection"`, `getattr(m, "task", ...) != "classification"`, `task.name == ...`), and, inside a Task class, of
    `self.name` against a string. A check whose `if` only raises is a refusal (a detector attack given a
    classifier), not a branch."""
    found = []

    def visit(node: ast.AST, in_task_class: bool, refusal: bool) -> None:
        if isinstance(node, ast.ClassDef):
            in_task_class = any("Task" in ast.unparse(b) for b in node.bases) or node.name == "Task"
        if isinstance(node, ast.If):
            only_raises = len(node.body) == 1 and isinstance(node.body[0], ast.Raise) and not node.orelse
            visit(node.test, in_task_class, only_raises)
            for child in [*node.body, *node.orelse]:
                visit(child, in_task_class, False)
            return
        if isinstance(node, ast.Compare) and not refusal:
            sides = [node.left, *node.comparators]
            text = [ast.unparse(side) for side in sides if not isinstance(side, ast.Constant)]
            if any(isinstance(side, ast.Constant) and isinstance(side.value, str) for side in sides) and \
                    (any("task" in t for t in text) or (in_task_class and "self.name" in text)):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, in_task_class, refusal)

    visit(ast.parse(path.read_text()), False, False)
    return found


@pytest.mark.parametrize("module", sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")))
def test_nothing_branches_on_the_task(module):
    """No module of robustlab branches on a task's name: what differs between the tasks is a method or a declared
    capability of the Task (engine/tasks.py)."""
    assert not _task_comparisons(SRC / module)


def test_the_checker_finds_a_branch(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('if self.task == "detection":\n    pass\nif getattr(model, "task", "x") != "y":\n    pass\n'
                 'if task.name == "detection":\n    pass\nclass T(Task):\n    def f(self):\n'
                 '        return 1 if self.name != "classification" else 2\n'
                 'if getattr(m, "task", None) != "detection":\n    raise ValueError("a refusal, not a branch")\n')
    assert len(_task_comparisons(p)) == 4


def test_tasks_are_registered_and_found_from_data_and_models(digits):
    assert set(TASKS.names()) == {"classification", "detection"}
    assert isinstance(task_of(digits), Classification) and isinstance(task_of(SimpleNamespace(task="detection")), Detection)
    assert isinstance(task_of(object()), Classification)  # a user's plain nn.Module
    assert Classification.box == (0.0, 1.0) and Detection.box == (0.0, 255.0)
    assert all(issubclass(TASKS.get(n), Task) for n in TASKS.names())


def test_classifier_eval_writes_a_report(tmp_path, digits_mlp, capsys):
    from robustlab.cli.main import main
    from robustlab.engine.checkpoint import save_model

    ckpt = save_model(tmp_path / "m.safetensors", digits_mlp, extra={"config": {"dataset": "digits"}})
    rc = main(["eval", "--model", str(ckpt), "--attack", "fgsm:eps=0.1", "--n-samples", "50", "--quiet",
               "--report", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    report = (tmp_path / "rep" / "report.md").read_text()
    assert rc == 0 and "# Classification evaluation: m.safetensors" in report and "fgsm" in report
    assert "Reproduce:" in report and "Machine:" in report
    table = next(line for line in out.splitlines() if "fgsm" in line)
    assert table in report  # the printed table is the report's
