#!/usr/bin/env bash
# The check call on a lent GPU machine kept warm from train_call.sh (scripts/device/README.md): the
# bundled mux models join the baseline, then benchmarks/gpu_check.py on all three.
set -u
SITE=${TMPDIR:-/tmp}/site  # the serving dependencies' wheels, installed here
T0=$(date +%s)
W=${WORK:-${TMPDIR:-/tmp}/w}  # kept between calls while the machine is held
export PYTHONUNBUFFERED=1
if [ "${DEVICE:-cuda}" = cuda ]; then
  export PYTHONPATH=$PWD/server:$SITE
  # wheels left out of the training call's payload, if any
  if [ -d .dev2/whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .dev2/whl/*.whl; fi
  python3 -c "import fastapi, muxserve.serving.server" || echo IMPORT-FAIL
fi
test -f $W/mr/sst2-bert/1/model.safetensors || { echo "call 1's files are gone (machine not kept warm)"; ls "${TMPDIR:-/tmp}"; exit 3; }
for n in 2 5; do
  python3 scripts/weights_pack.py unpack .dev2/mux$n $W/mr/sst2-mux$n/1 >/dev/null || exit 1
  cp $W/mr/sst2-bert/1/tokenizer.json $W/mr/sst2-mux$n/1/ && cp model_repository/sst2-mux$n/config.pbtxt $W/mr/sst2-mux$n/
done
sha256sum $W/mr/*/1/model.safetensors
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
echo "setup $(( $(date +%s) - T0 )) s"
timeout ${CHECK_TIMEOUT:-260} python3 benchmarks/gpu_check.py --model-repository $W/mr --data $W/data/dev.tsv --device ${DEVICE:-cuda} --out $OUT/gpu_check.json ${CHECK_ARGS:-}
echo "rc=$? done $(( $(date +%s) - T0 )) s"
