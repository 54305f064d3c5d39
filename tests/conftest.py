"""Test-session setup: hcd is imported before TensorFlow, as in its binaries.

hcd sets TensorFlow's oneDNN default when it is imported, and TensorFlow
chooses its CPU kernels when it is imported (hcd/__init__.py); a test module
that imports tensorflow first would otherwise run the whole session on other
kernels than hcd_train does.
"""

import hcd  # pylint: disable=unused-import
