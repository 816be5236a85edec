"""parallel.to_host and parallel.gather on 4 CPU devices: in one process, and in two processes of two.

Each case runs in fresh subprocesses, since the device count is fixed when JAX starts.
"""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120

# Rows 0..7 of a (8, 3) array; prints nothing and exits 0 when every check holds.
_WORKER = r'''
import sys
import jax
num_processes, process_id, port = map(int, sys.argv[1:])
if num_processes > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
                             process_id=process_id)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scoresde.infra import parallel

assert jax.device_count() == 4 and jax.process_count() == num_processes
value = np.arange(24, dtype=np.float32).reshape(8, 3)
local_rows = 8 // num_processes
mine = value[process_id * local_rows:(process_id + 1) * local_rows]
mesh = parallel.data_mesh()

replicated = jax.device_put(value, parallel.replicated(mesh))
np.testing.assert_array_equal(parallel.to_host(replicated), value)

sharded = parallel.shard_batch(mesh, mine)
assert sharded.shape == (8, 3)
np.testing.assert_array_equal(parallel.to_host(sharded), value if num_processes == 1 else mine)
np.testing.assert_array_equal(parallel.gather(sharded), value)
np.testing.assert_array_equal(parallel.gather(mine), value)

# Batch split over processes only: each process's two devices hold the same rows.
grid = Mesh(np.array(jax.devices()).reshape(num_processes, -1), ('data', 'model'))
doubled = jax.make_array_from_process_local_data(NamedSharding(grid, P('data')), mine, (8, 3))
np.testing.assert_array_equal(parallel.to_host(doubled), value if num_processes == 1 else mine)
parallel.sync('done')
'''


def _run(num_processes: int) -> None:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={4 // num_processes}')
  procs = [subprocess.Popen(
      ['timeout', '-s', 'KILL', str(TIMEOUT), sys.executable, '-c', _WORKER, str(num_processes), str(i),
       str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  for i, proc in enumerate(procs):
    output, _ = proc.communicate(timeout=TIMEOUT + 10)
    assert proc.returncode == 0, f'process {i} exited {proc.returncode}:\n{output[-4000:]}'


def test_one_process_four_devices():
  _run(1)


@pytest.mark.multiprocess
def test_two_processes_replicated_and_sharded_rows():
  _run(2)
