#!/usr/bin/env bash
# Runs once inside the new conda env, in Snakemake's working directory, which must be the
# medvit checkout (the workflow reads its schema and studies from there too).
set -euo pipefail
if ! grep -qs '^name = "medvit"' pyproject.toml; then
  echo "error: run snakemake from the medvit checkout (no medvit pyproject.toml in $PWD)" >&2
  exit 1
fi
python -m pip install --no-deps -e .
