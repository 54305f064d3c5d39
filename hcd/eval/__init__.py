"""After training: evaluation, prediction, submissions, reports, EDA, export.

  inputs.py      evaluation and prediction input: shards, or image folders
                 (checked here, decoded in tf.data to the shard writer's
                 pixels), built by hcd.data.pipeline
  predict.py     batched prediction with dihedral TTA and run ensembles;
                 loading saved models (safe mode)
  submission.py  the Kaggle submission: id order, validation, atomic write
  evaluate.py    metrics.json + ROC / confusion-matrix PNGs for a model
  report.py      the run comparison table and validation-AUC overlay
  eda.py         label frequencies, sample grids, scanner-flagged images
  export.py      a self-contained .keras / SavedModel for deployment

Run directories (names, readers, which model file) are hcd/rundir.py's.
Library code only: no absl flags here (binaries live in hcd/cli).
"""
