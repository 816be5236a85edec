"""Suite-wide pytest hooks."""

# The cross-implementation tests (against PyTorch and pytorch-fid) skip with a reason naming the file
# that lists their optional dependencies.
OPTIONAL_DEPENDENCIES = 'requirements-test.txt'


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def _count(tests: int) -> str:
  return 'whole module' if not tests else f'{tests} test' + 's' * (tests != 1)


def pytest_terminal_summary(terminalreporter) -> None:
  """Ends the run by naming the cross-checks that did not run and the one command that runs them, so a
  `make test` without torch cannot pass while silently leaving them out."""
  tests_per_file: dict[str, int] = {}
  for report in terminalreporter.stats.get('skipped', []):
    if OPTIONAL_DEPENDENCIES in _skip_reason(report):
      file, _, test = report.nodeid.partition('::')
      tests_per_file[file] = tests_per_file.get(file, 0) + bool(test)  # no test part: the whole module
  if not tests_per_file:
    return
  where = ', '.join(f'{file} ({_count(n)})' for file, n in sorted(tests_per_file.items()))
  terminalreporter.write_sep('=', 'cross-implementation tests not run', yellow=True)
  terminalreporter.write_line(f'Skipped, torch / pytorch-fid not installed: {where}. '
                              f'Run `make env-test test` to run them (installs {OPTIONAL_DEPENDENCIES}).')
