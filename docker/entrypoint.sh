#!/usr/bin/env bash
# hcd container entrypoint: runs the hcd command given, with its flags passed through.
#   hcd_train|hcd_evaluate|hcd_predict|hcd_report ...   console scripts on PATH
#   tools/<name> ...                                   the image's tools (resolved under $HCD_HOME)
#   anything else                                      run as is (bash, python3, ...)
set -euo pipefail
if [[ $# -eq 0 ]]; then
  set -- hcd_train --helpfull
fi
case "$1" in
  tools/*|bench/*)
    if [[ ! -e "$1" && -e "${HCD_HOME:-/opt/hcd}/$1" ]]; then
      cmd="${HCD_HOME:-/opt/hcd}/$1"
      shift
      set -- "$cmd" "$@"
    fi
    ;;
esac
exec "$@"
