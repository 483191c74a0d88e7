"""robustlab's version: one place, read by the package (`robustlab.__version__`), its build (pyproject.toml) and
everything that records which robustlab wrote it (evaluation states, the results store)."""

__version__ = "0.2.0"  # 0.2.0: APGD-T and Square draw differently (a 0.1.0 --state is not resumed)
