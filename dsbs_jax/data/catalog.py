"""The datasets dsbs-jax ships: the embedded demo and the paper's four benchmarks.

Nothing is registered at import. Gin files register the one a run uses
(`DATASET = @benchmarks.register()`); command-line tools that take a task name
(`--list_tasks`, the vocabulary trainer) register a built-in family here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

from dsbs_jax.data import benchmarks, demo, tasks

BUILTIN: dict[str, Callable[..., tasks.StepByStepFamily]] = {
    demo.NAME: demo.register,
    **{name: functools.partial(benchmarks.register, name) for name in benchmarks.BENCHMARKS},
}


def register_all(data_root: Optional[str] = None) -> None:
  """Registers every built-in family (reading no file)."""
  for name, register in BUILTIN.items():
    register(**({} if name == demo.NAME else {'root': data_root}))


def register_for(mixture_or_task_name: str, data_root: Optional[str] = None) -> None:
  """Makes a name usable: the built-in families are registered, and a name of none of
  them must be registered already (a user's own SeqIO task), else a `ConfigError`."""
  register_all(data_root)
  tasks.check_registered(mixture_or_task_name)
