"""docs/architecture.md adds an attack, a method and a dataset, each in one block, then trains and evaluates with
them: the blocks run here as written, in a fresh interpreter (their registry lines must not leak into the other
tests' registries)."""
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_architecture_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 4 and "@ATTACKS.register" in blocks[0] and "@METHODS.register" in blocks[1]
    assert "@DATASETS.register" in blocks[2] and "Trainer(cfg)" in blocks[3]
    script = tmp_path / "example.py"
    script.write_text("\n\n".join(blocks) + "\nprint('example ok', noise, pgd)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "example ok" in out.stdout, out.stderr[-3000:]
