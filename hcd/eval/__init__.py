"""After training: evaluation, prediction, submissions, reports, EDA, export.

  runs.py        reading run directories; loading saved models (safe mode)
  inputs.py      tf.data input for prediction: shards, or image folders
                 decoded in tf.data to the shard writer's pixels
  predict.py     batched prediction with dihedral TTA and run ensembles
  submission.py  the Kaggle submission: id order, validation, atomic write
  evaluate.py    metrics.json + ROC / confusion-matrix PNGs for a model
  report.py      the run comparison table and validation-AUC overlay
  eda.py         label frequencies, sample grids, scanner-flagged images
  export.py      a self-contained .keras / SavedModel for deployment

Library code only: no absl flags here (binaries live in hcd/cli).
"""
