"""hcd: high-throughput histopathologic cancer detection on TensorFlow.

Only the version lives here; nothing is imported for its side effects so that
`import hcd.data.quality` in a scanner worker stays free of TensorFlow.
"""

__version__ = "0.1.0"
