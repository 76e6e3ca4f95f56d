"""dsbs-jax: distilling step-by-step for T5 students in JAX/Flax."""

import os

# XLA CPU's YNNPACK fusions make the T5 train step about 25% slower on CPU
# (bench/README.md); they are left off unless XLA_FLAGS already chooses. This
# must happen before JAX starts its CPU backend, hence at import; TPU and GPU
# backends ignore the flag.
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
if _YNN_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_YNN_FLAG}='.strip()
