"""Prints the model table: name, parameter count, default lr, description.

  python -m hcd.models

One line per model, in table order, no header (so every line parses the
same way): `<name> <parameters, with thousands commas> <lr> <description>`.
The count is measured by building the model (random init, nothing
downloaded).
"""

from __future__ import annotations

import os
import sys


def format_table() -> str:
  """Builds every model in the table and returns the printed table.

  Returns:
    One line per model: `<name>  <params with commas>  <lr>  <description>`.
  """
  import hcd.models as models  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  rows = []
  for name in models.model_names():
    model = models.build_model(name)
    rows.append((name, f"{models.count_params(model):,}",
                 f"{models.default_learning_rate(name):g}",
                 models.MODELS[name].description))
    del model
    keras.backend.clear_session()
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = []
  for r in rows:
    lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  "
                 f"{r[2]:>{widths[2]}}  {r[3]}")
  return "\n".join(lines)


def main() -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from hcd import tflog  # pylint: disable=g-import-not-at-top
  tflog.install()
  print(format_table())
  return 0


if __name__ == "__main__":
  sys.exit(main())
