#!/usr/bin/env bash
# v28 call 8 (nvidia-h200): the fixed-shape step's torch ops through torch.compile (StaticDecoder(compile=True), the
# MoSA heads' op a graph break) against the plain step, batch 1, 128-token prompts, float32; compile time logged.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
timeout 60 python3 benchmarks/bench_generation.py --device cuda --models dense mosa-hybrid pure-mosa --prompt-lens 128 \
  --new-tokens 32 --batch 1 8 --repeats 1 --out $O/gen_plain.json > $O/gen_plain.log 2>&1
echo "rc=$?" >> $O/gen_plain.log; grep -E "B=|rc=|Error" $O/gen_plain.log | cut -c1-125
/usr/bin/time -v timeout 400 python3 benchmarks/bench_generation.py --device cuda --models dense mosa-hybrid pure-mosa \
  --prompt-lens 128 --new-tokens 32 --batch 1 8 --repeats 1 --compile-step --out $O/gen_compiled.json > $O/gen_compiled.log 2>&1
echo "rc=$?" >> $O/gen_compiled.log; grep -E "B=|rc=|Error|Elapsed|recompil" $O/gen_compiled.log | cut -c1-125
cd $OUT && tar czf all.tar.gz x && rm -rf x
