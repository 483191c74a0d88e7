"""robustlab's version: one place, read by the package (`robustlab.__version__`), its build (pyproject.toml) and
everything that records which robustlab wrote it (evaluation states, the results store)."""

__version__ = "0.3.0"  # 0.3.0: eot > 1 attacks judge iterates by the EoT estimate, randomised models are judged by
# `draws` passes (a 0.2.0 --state is not resumed); 0.2.0: APGD-T and Square draw differently
