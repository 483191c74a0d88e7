"""Object detection (one-stage SSD). Box geometry lives in `boxes`; the detector, data, mAP and the
class-aware attacks and training arrive with the detection issues (spec: shared/spec/cwat.md)."""
