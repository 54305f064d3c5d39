"""Training: runtime (strategy/XLA/precision), the custom loop, run artifacts.

The run directory's names and TF-free readers/writers are hcd/rundir.py's;
hcd/train/artifacts.py adds the Keras model and the plots.
"""
