"""Instance segmentation app: ``python -m apps.detect {train,eval,predict,scenes}``.

Mask R-CNN + FPN on a PPMA backbone (:mod:`ppma_models.detection`), trained on the shared
engine (:mod:`apps.engine`): the shared options and ``run_command`` for the command line, a
:class:`~apps.detect.train.DetectTask` for ``run_training``. Modules:
  cli          the command line (the engine's shared options + the detector's)
  settings     batch size, epochs and warm-up fitted to the data when left out
  scenes       built-in instance scenes: the segment app's Fashion-MNIST scenes, per item
  coco         COCO-format annotations: validated reading (every problem listed), writing
  data         sources (scenes, COCO folders), tensor samples, batches, the epoch sampler
  transforms   tv_tensors and the transforms v2 augmentation (flip, scale jitter)
  model        DetectorSpec (the run spec's model description), building and loading
  train        DetectTask: the detect app's part of the engine's train command
  metrics      COCO AP for boxes and masks with pycocotools, per-class AP
  evaluate     inference over a data set (sharded under torchrun) and the eval command
  plots        the precision-recall figure
  predict      the predict command: drawn detections and COCO results JSON
  scene_files  the scenes command: the built-in scenes written as a COCO dataset
"""
