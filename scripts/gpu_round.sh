#!/bin/bash
# usage: scripts/gpu_round.sh OUTDIR TEST...   (each test: a pytest node id), logs per test
out=$1; shift
for t in "$@"; do
  name=$(echo "$t" | tr '/:[]' '____')
  timeout 240 python -m pytest -q -x -s -m gpu -p no:cacheprovider "$t" > "$out/$name.log" 2>&1
  echo "$t rc=$?" | tee -a "$out/summary.txt"
done
