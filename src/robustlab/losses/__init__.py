from robustlab.losses.classification import (
    LOSSES,
    ce_loss,
    cw_margin_loss,
    dlr_loss,
    dlr_targeted_loss,
    get_loss,
    margin,
    probability_margin_loss,
)

__all__ = ["LOSSES", "ce_loss", "cw_margin_loss", "dlr_loss", "dlr_targeted_loss", "get_loss", "margin",
           "probability_margin_loss"]
