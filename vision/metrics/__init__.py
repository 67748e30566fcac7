"""Scores of predictions against ground truth: COCO (pycocotools), semantic IoU, classification top-k."""
