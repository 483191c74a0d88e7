"""Analyses beside training and evaluation: the WPGD paper's figures and tables (`wpgd`). The label metrics they
use live in `robustlab.label_metrics` (below `methods`: WPGD trains with one)."""
