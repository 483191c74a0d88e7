"""Analyses beside training and evaluation: label metrics (`label_metric`, `visual_metric`), the WPGD paper's
figures and tables (`wpgd`). Import the module you need; this package imports nothing on its own, so that a method
can use the label metrics without pulling in the analyses (which train and evaluate models)."""
