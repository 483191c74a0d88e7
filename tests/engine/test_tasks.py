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
    """Comparisons of something that reads a task against a string (`if self.task == "detection"`,
    `getattr(m, "task", ...) != "classification"`, `task.name == ...`): a branch on which task it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides) and \
                    any("task" in ast.unparse(s) for s in sides if not isinstance(s, ast.Constant)):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", ["engine/trainer.py", "cli/main.py", "cli/training.py"])
def test_trainer_and_eval_command_do_not_branch_on_the_task(module):
    assert not _task_comparisons(SRC / module)


def test_the_checker_finds_a_branch(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('if self.task == "detection":\n    pass\nif getattr(model, "task", "x") != "y":\n    pass\n'
                 'if task.name == "detection":\n    pass\n')
    assert len(_task_comparisons(p)) == 3


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
