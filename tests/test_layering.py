"""The import layering of .importlinter holds, and a forbidden import is caught (import-linter)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
pytestmark = pytest.mark.skipif(not os.path.exists(LINT),
                                reason='import-linter is not installed (requirements-test.txt)')


def _lint(cwd: str) -> subprocess.CompletedProcess:
  return subprocess.run([LINT, '--no-cache'], cwd=cwd, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'PYTHONPATH': cwd, 'COLUMNS': '400'})


def test_repository_keeps_every_contract():
  out = _lint(ROOT)
  assert out.returncode == 0, out.stdout + out.stderr
  assert '0 broken' in out.stdout


@pytest.mark.parametrize('source, line, contract', [
    ('sampling.py', 'from scoresde.models import utils as _mutils', 'Samplers and likelihood'),
    ('sde_lib.py', 'from scoresde.infra import parallel as _parallel', 'sde_lib imports nothing'),
    ('models/ncsnpp.py', 'from scoresde import datasets as _datasets', 'Networks never import'),
    ('infra/images.py', 'from scoresde import run_lib as _run_lib', 'Layers'),
])
def test_a_forbidden_import_breaks_the_build(tmp_path, source, line, contract):
  for item in ('scoresde', 'configs', '.importlinter'):
    copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, item)) else shutil.copy
    copy(os.path.join(ROOT, item), tmp_path / item)
  with open(tmp_path / 'scoresde' / source, 'a', encoding='utf-8') as f:
    f.write(f'\n{line}\n')
  out = _lint(str(tmp_path))
  assert out.returncode != 0
  broken = [l for l in out.stdout.splitlines() if l.endswith('BROKEN')]
  assert any(l.startswith(contract) for l in broken), out.stdout
