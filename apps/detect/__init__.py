"""Instance segmentation app: ``python -m apps.detect {train,eval,predict,scenes}``.

Mask R-CNN + FPN on a PPMA backbone (:mod:`ppma_models.detection`), trained on the shared
engine (:mod:`apps.engine`). Modules:
  cli          argument parsing and the commands' entry point
  scenes       built-in instance scenes: the segment app's Fashion-MNIST scenes, per item
  coco         COCO-format annotations: validated reading (every problem listed), writing
  data         sources (scenes, COCO folders), tensor samples, batches, the epoch sampler
  transforms   tv_tensors and the transforms v2 augmentation (flip, scale jitter)
  model        DetectorSpec (stored in checkpoints), building and loading the detector
  train        the train command on apps.engine.Trainer
  metrics      COCO AP for boxes and masks with pycocotools, per-class AP
  evaluate     inference over a data set (sharded under torchrun) and the eval command
  plots        the precision-recall figure
  predict      the predict command: drawn detections and COCO results JSON
  scene_files  the scenes command: the built-in scenes written as a COCO dataset
"""
