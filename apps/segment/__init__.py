"""Semantic segmentation app: ``python -m apps.segment {train,eval,predict}``.

Modules:
  cli         argument parsing and the three commands' entry point
  scenes      built-in deterministic Fashion-MNIST scenes (11 classes, exact masks)
  folder      a user's images/ + masks/ folder, validated pair by pair
  data        sources, tensor samples with seeded augmentation, the epoch sampler
  settings    crop, batch size, epochs and warmup chosen from the data, and their report
  transforms  normalisation and the joint random scale / crop / flip
  model       ModelSpec (stored in checkpoints), building and loading the UPerNet model
  train       the train command on apps.engine.Trainer
  evaluate    confusion-matrix evaluation (whole / sliding window) and the eval command
  inference   whole-image and sliding-window logits
  metrics     confusion matrix, per-class IoU, mIoU, pixel accuracy
  predict     the predict command: colour-coded masks and overlays
  palette     class colours, index PNGs, overlays
"""
