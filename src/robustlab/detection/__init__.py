"""Object detection (one-stage SSD; spec shared/spec/cwat.md): box geometry (`boxes`), detectors (`models`),
the multibox loss and its per-object / per-class decomposition (`loss`), post-processing, mAP (`metrics`),
data (`data`: MNIST-Det, VOC, COCO), evaluation (`evaluate`), attack objectives (`objectives`) and attacks
(`attacks`: det-fgsm, det-pgd, owa, cwa, mda, dag)."""
from robustlab.detection import attacks, data, models  # noqa: F401  (registers detection attacks, datasets, models)
from robustlab.detection.data import DetData
from robustlab.detection.evaluate import evaluate_detector
from robustlab.detection.loss import Decomp, decompose, multibox_loss
from robustlab.detection.postprocess import Detections, detect

__all__ = ["DetData", "Decomp", "Detections", "decompose", "detect", "evaluate_detector", "multibox_loss"]
