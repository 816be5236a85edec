"""``config.model.remat``: per-block activation checkpointing changes the program, not the function.

The same parameter tree (names and shapes) with and without remat, so variables initialised without it
(and released checkpoints) load into the rematerialised network; equal outputs and gradients (train mode,
dropout included: flax derives each block's dropout key from its path, which remat keeps); and the
gradient's jaxpr holds checkpoint (``remat2``) primitives only with remat on.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresde.models import utils
from test_models import compiled, random_variables, tiny_config

# Tiny networks covering every block that remat wraps: NCSN++'s BigGAN and DDPM++ residual blocks and its
# attention, DDPM's residual and attention blocks, NCSNv2's residual blocks.
CASES = {
    # FIR resampling is left out: it is not a block remat wraps, and it triples the compile time.
    'ncsnpp_biggan': dict(name='ncsnpp', resblock_type='biggan', fir=False, progressive_input='residual',
                          embedding_type='fourier', scale_by_sigma=True),
    'ddpmpp': dict(name='ncsnpp', resblock_type='ddpm', fir=False, progressive_input='none',
                   embedding_type='positional'),
    'ddpm': dict(name='ddpm', nf=32, ch_mult=(1, 1)),
    'ncsnv2': dict(name='ncsnv2_64', normalization='InstanceNorm++', nonlinearity='elu'),
}
BATCH = 2


def _configs(case: str):
  """The tiny config of ``case`` without and with remat."""
  overrides = dict(CASES[case])
  config = tiny_config(overrides.pop('name'), **overrides)
  config.training.continuous = overrides.get('embedding_type') == 'fourier'
  with_remat = config.copy_and_resolve_references()
  with_remat.model.remat = True
  return config, with_remat


def _inputs(config):
  x = jax.random.uniform(jax.random.key(1), (BATCH,) + utils.create_model(config).input_shape)
  if config.training.continuous:
    return x, jnp.linspace(0.1, 5., BATCH)
  return x, jnp.arange(BATCH) % config.model.num_scales


def _loss_and_grad(model):
  """``(variables, x, labels) -> ((loss, output), grads)`` in train mode, dropout with a fixed key."""
  def loss(variables, x, labels):
    out = model.apply(variables, x, labels, train=True, rngs={'dropout': jax.random.key(2)})
    return jnp.sum(out ** 2), out
  return jax.value_and_grad(loss, has_aux=True)


def _primitive_names(jaxpr) -> set[str]:
  """Every primitive in ``jaxpr``, nested jaxprs (checkpoint, pjit, custom_vjp bodies) included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, 'eqns') or hasattr(sub, 'jaxpr'):
          names |= _primitive_names(sub)
  return names


def _flat_shapes(tree) -> dict:
  return {path: (leaf.shape, leaf.dtype) for path, leaf in flax.traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize('case', sorted(CASES))
def test_remat_keeps_parameters_outputs_and_gradients(case):
  config, with_remat = _configs(case)
  utils.validate_model_config(with_remat)
  model, model_remat = utils.create_model(config), utils.create_model(with_remat)
  x, labels = _inputs(config)
  shapes = [_flat_shapes(jax.eval_shape(lambda m=m: m.init({'params': jax.random.key(0)}, x, labels)))
            for m in (model, model_remat)]
  assert shapes[1] == shapes[0]

  variables = random_variables(model, x, labels)  # initialised for the network without remat

  def both(variables, x, labels):
    return _loss_and_grad(model)(variables, x, labels), _loss_and_grad(model_remat)(variables, x, labels)

  ((_, out), grads), ((_, out_remat), grads_remat) = compiled(both, variables, x, labels)(variables, x, labels)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out_remat, out, rtol=1e-5, atol=1e-5)
  flat, flat_remat = (flax.traverse_util.flatten_dict(g) for g in (grads, grads_remat))
  assert flat.keys() == flat_remat.keys()
  for path, g in flat.items():
    # Recomputing a block lets XLA fuse (and so round) its float32 sums differently: an entry may move by
    # ~1e-6 of the leaf's scale, whatever its own size.
    scale = max(1., float(jnp.max(jnp.abs(g))))
    np.testing.assert_allclose(flat_remat[path], g, rtol=1e-5, atol=1e-5 * scale, err_msg='/'.join(path))


@pytest.mark.parametrize('case', ['ddpmpp', 'ddpm'])
def test_remat_puts_checkpoints_in_the_gradient_program(case):
  config, with_remat = _configs(case)
  x, labels = _inputs(config)
  variables = jax.eval_shape(lambda: random_variables(utils.create_model(config), x, labels))
  names, names_remat = (_primitive_names(jax.make_jaxpr(_loss_and_grad(utils.create_model(c)))(variables, x,
                                                                                                   labels))
                        for c in (config, with_remat))
  is_remat = lambda name: name.startswith(('checkpoint', 'remat'))  # 'remat2' in jax 0.10
  assert any(map(is_remat, names_remat))
  assert not any(map(is_remat, names))
