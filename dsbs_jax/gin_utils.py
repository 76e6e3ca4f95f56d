"""Gin at the edge: the shipped config files, T5X's flags, and bindings that must take effect.

The library never imports gin; the command-line tools use this module to parse
`--gin_file`/`--gin.KEY=VALUE` as `t5x.train` does, with four additions:

  * the shipped `gin/` directory is always searched, from a checkout and from an
    installed wheel, so `--gin_file=gin/demo.gin` and `--gin_file=demo.gin` work
    anywhere; gin files may also be URLs (`gs://...`);
  * an explicit `MIXTURE_OR_TASK_NAME` is checked against the data settings
    (`tasks.select`) instead of silently replacing them;
  * a binding or macro that nothing the run calls reads is an error naming its
    file and line, with the nearest known names (`check_bindings_used`);
  * text gin cannot parse is an error naming its file and line, or the binding,
    rather than the parser's traceback.
"""

from __future__ import annotations

import collections
import difflib
import io
import os
import re
import tokenize
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import gin
from dsbs_jax import storage
from dsbs_jax.errors import ConfigError
from gin import config_parser

_MACRO = 'gin.macro'
_TASK_MACRO = 'MIXTURE_OR_TASK_NAME'


def shipped_gin_dir() -> str:
  """The gin/ directory: `dsbs_jax/gin` in a wheel, the checkout's `gin/` in a source tree."""
  import dsbs_jax

  package = os.path.dirname(os.path.abspath(dsbs_jax.__file__))
  for candidate in (os.path.join(package, 'gin'), os.path.join(os.path.dirname(package), 'gin')):
    if os.path.isfile(os.path.join(candidate, 'train.gin')):
      return candidate
  raise ConfigError(
      f'the shipped gin files are missing (looked in {package}/gin and beside '
      'the package); reinstall dsbs-jax'
  )


def search_paths(user_paths: Sequence[str]) -> list[str]:
  """The user's paths, then the shipped gin/ and its parent (for `gin/...` spellings)."""
  shipped = shipped_gin_dir()
  return [*user_paths, shipped, os.path.dirname(shipped)]


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`, as t5x does."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      key, sep, value = arg[len('--gin.') :].partition('=')
      if not sep:
        raise ConfigError(f'{arg}: expected --gin.KEY=VALUE')
      arg = f'--gin_bindings={key} = {value}'
    out.append(arg)
  return out


def _open_url(path: str) -> io.StringIO:
  return io.StringIO(storage.read_text(path))


def parse(files: Sequence[str], bindings: Sequence[str], user_search_paths: Sequence[str]) -> None:
  """Parses gin files and bindings (onto an empty config) as `t5x.train` does, without
  finalizing.

  A literal `MIXTURE_OR_TASK_NAME` becomes the `name` that `tasks.select` checks
  against DATASET, TASK_VARIANT and LABEL_SOURCE, so the data settings always
  take effect.
  """
  gin.clear_config()
  gin.config.register_file_reader(_open_url, lambda p: storage.is_url(p) and storage.exists(p))
  for path in search_paths(user_search_paths):
    gin.add_config_file_search_path(path)
  _all_statements(files, bindings)  # text gin cannot parse: one line, not its traceback
  gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  try:
    name = gin.query_parameter(f'%{_TASK_MACRO}')
  except ValueError:
    return
  if isinstance(name, str):
    gin.parse_config(
        [
            'from __gin__ import dynamic_registration',
            'from dsbs_jax.data import tasks',
            f'tasks.select.name = {name!r}',
            f'{_TASK_MACRO} = @tasks.select()',
        ]
    )


def binds_any(selector: str, parameters: Sequence[str]) -> bool:
  """Whether the parsed config gives `selector` (registered or not) any of `parameters`."""
  for name in parameters:
    try:
      gin.query_parameter(f'{selector}.{name}')
    except ValueError:
      continue
    return True
  return False


def used_bindings(root: str) -> set[tuple[str, str]]:
  """The `(scope, selector)` keys of gin's config that calling `root` reads.

  Follows every `@configurable` and `%MACRO` reference from the root's bindings;
  a configurable called in scope `a/b` reads the bindings of scopes `a/b`, `a`
  and none, and a macro `%X` the binding of `X`.
  """
  config = gin.config._CONFIG  # pylint: disable=protected-access
  scopes_of = collections.defaultdict(set)
  for scope, selector in config:
    scopes_of[selector].add(scope)
  root_selector = gin.config._REGISTRY.get_match(root).selector  # pylint: disable=protected-access
  used: set[tuple[str, str]] = set()
  pending: list[tuple[tuple[str, ...], str, str]] = [((), root_selector, '')]
  seen = set()
  while pending:
    call_scopes, selector, macro = item = pending.pop()
    if item in seen:
      continue
    seen.add(item)
    if selector == _MACRO:
      keys = [(macro, _MACRO)] if macro in scopes_of[_MACRO] else []
    else:
      prefixes = {'/'.join(call_scopes[:i]) for i in range(len(call_scopes) + 1)}
      keys = [(scope, selector) for scope in scopes_of.get(selector, ()) if scope in prefixes]
    for key in keys:
      used.add(key)
      for reference in gin.config.iterate_references(config[key]):
        selector_ = reference.configurable.selector
        if selector_ == _MACRO:
          pending.append((call_scopes, _MACRO, '/'.join(reference.scopes)))
        else:
          pending.append((call_scopes + tuple(reference.scopes), selector_, ''))
  return used


class _Syntax(config_parser.ParserDelegate):
  """Parses statements without resolving references (for their locations)."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return scoped_configurable_name

  def macro(self, macro_name):
    return macro_name


def _parsed(text: str, path: Optional[str] = None, bindings: Sequence[str] = ()) -> list[Any]:
  """The gin statements of file `path`'s `text`, or of `bindings` (`text` is them
  joined, as gin joins them), references unresolved. Text that gin cannot parse is a
  `ConfigError` naming the file and line, or the binding."""
  try:
    return list(config_parser.ConfigParser(io.StringIO(text, newline=None), _Syntax()))
  except SyntaxError as e:
    what, line, shown = e.msg.rstrip('.'), e.lineno or 0, (e.text or '').strip()
  except tokenize.TokenError as e:  # at the end of the text, so no line to show
    (what, (line, _)), shown = e.args, ''
    what += ' (a bracket or quote left open)'
  if what.startswith('malformed node'):  # ast.literal_eval's words for a bare name
    what = 'Unable to parse value'
  if what == 'Unable to parse value':
    what += ' (a value is a Python literal, @reference or %MACRO: a string needs quotes)'
  if path is None:
    if len(bindings) > 1:  # an open bracket swallows the bindings after it
      for binding in bindings:
        _parsed(binding, bindings=[binding])  # raises for the first that fails alone
    raise ConfigError(f'gin cannot parse the binding {_binding_at(bindings, line)!r}: {what}')
  if not shown:
    raise ConfigError(f'{path}: gin cannot parse the file: {what}')
  raise ConfigError(f'{path}:{line}: gin cannot parse {shown!r}: {what}')


def _binding_at(bindings: Sequence[str], line: int) -> str:
  """The binding that holds `line` of the bindings joined (the last, past their end)."""
  end = 0
  for binding in bindings:
    end += binding.count('\n') + 1
    if line <= end:
      return binding
  return bindings[-1]


def _all_statements(
    files: Sequence[str], bindings: Sequence[str]
) -> list[config_parser.BindingStatement]:
  """Every binding statement of `files`, then of `bindings` and the files they include,
  in gin's order. Text that gin cannot parse is a `ConfigError` (its file and line,
  or the binding) instead of the parser's traceback."""
  statements = list(_statements(files))
  for s in _parsed('\n'.join(bindings), bindings=bindings) if bindings else ():
    if isinstance(s, config_parser.IncludeStatement):
      statements.extend(_statements([s.filename]))
    elif isinstance(s, config_parser.BindingStatement):
      statements.append(s)
  return statements


def _statements(files: Sequence[str]) -> Iterable[config_parser.BindingStatement]:
  """Every binding statement of `files` and their includes, in parse order. A file
  that is not found or cannot be read is left for gin to report."""
  for name in files:
    path = next(
        (
            os.path.join(p, name)
            for p in gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
            if os.path.isfile(os.path.join(p, name))
            or (storage.is_url(os.path.join(p, name)) and storage.exists(os.path.join(p, name)))
        ),
        None,
    )
    if path is None:
      continue
    try:
      text = storage.read_text(path)
    except OSError:
      continue
    for statement in _parsed(text, path):
      if isinstance(statement, config_parser.IncludeStatement):
        yield from _statements([statement.filename])
      elif isinstance(statement, config_parser.BindingStatement):
        yield statement._replace(location=statement.location._replace(filename=path))


def _where(key: tuple[str, str], files: Sequence[str], bindings: Sequence[str]) -> str:
  """`file:line` (or `--gin.…`) of the last statement that set `key`."""
  scope, selector = key
  found = 'the gin configuration'
  for s in _all_statements(files, bindings):
    macro = selector == _MACRO and s.scope == '' and s.selector == scope and not s.arg_name
    plain = (
        s.scope == scope
        and s.arg_name
        and (selector == s.selector or selector.endswith('.' + s.selector))
    )
    if macro or plain:
      found = (
          f'{s.location.filename}:{s.location.line_num}'
          if s.location.filename
          else f'--gin.{s.selector}' + (f'.{s.arg_name}' if s.arg_name else '')
      )
  return found


def check_bindings_used(root: str, files: Sequence[str], bindings: Sequence[str]) -> None:
  """Refuses bindings and macros that calling `root` would never read (typos, or
  settings that another binding overrides), naming where each was set."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  used = used_bindings(root)
  unused = [key for key in config if key not in used]
  if not unused:
    return
  used_macros = sorted(scope for scope, selector in used if selector == _MACRO)
  known = sorted({*used_macros, *(s for _, s in used if s != _MACRO)})
  problems = []
  for scope, selector in unused:
    if selector == _MACRO:
      what, candidates = f'the macro {scope}', used_macros
      name = scope
    else:
      what = (
          f'the binding {"/".join(filter(None, [scope, selector]))}.'
          f'{"|".join(sorted(config[(scope, selector)]))}'
      )
      candidates, name = known, selector
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f' (did you mean {" or ".join(close)}?)' if close else ''
    problems.append(
        f'{what} ({_where((scope, selector), files, bindings)}) is set but nothing '
        f'in this run reads it{hint}'
    )
  raise ConfigError('; '.join(sorted(problems)))


def unset_macro(error: Exception) -> Optional[str]:
  """The macro a gin error says has no value, if that is what it says."""
  match = re.search(r"configurable 'macro' .* in scope '([^']+)'", str(error))
  return match.group(1) if match else None
