"""Bad inputs fail early with a ValueError/TypeError whose message names the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compams_jax as cj
from tests import registry

C = cj.compressors


def _taking(argument: str) -> list[str]:
  """Registry names whose factory takes `argument`."""
  return [name for name, entry in C.REGISTRY.items() if argument in entry.parameters]


@pytest.mark.parametrize(
  "name, kwargs, exc",
  [
    pytest.param(name, bad, exc, id=f"{registry.case_id(name, bad)}-{exc.__name__}")
    for name, entry in C.REGISTRY.items()
    for bad, exc in entry.bad
  ],
)
def test_registry_bad_arguments(name, kwargs, exc):
  with pytest.raises(exc):
    C.get(name, **kwargs)
  with pytest.raises(exc):
    C.REGISTRY[name].factory(**kwargs)


@pytest.mark.parametrize("name", list(C.REGISTRY))
def test_registry_unknown_argument(name):
  with pytest.raises(
    ValueError, match=rf"compressor '{name}' takes .*got unexpected \['no_such_argument'\]"
  ):
    C.get(name, no_such_argument=1)


def test_registry_unknown_name_lists_every_name():
  with pytest.raises(ValueError, match="unknown compressor 'top-k'") as info:
    C.get("top-k")
  for name in C.REGISTRY:
    assert repr(name)[1:-1] in str(info.value)


@pytest.mark.parametrize(
  "factory", [C.REGISTRY[n].factory for n in _taking("ratio")], ids=_taking("ratio")
)
@pytest.mark.parametrize(
  "ratio, exc, match",
  [
    (0, ValueError, r"ratio must be in \(0, 1\], got 0"),
    (0.0, ValueError, r"ratio must be in \(0, 1\]"),
    (-0.1, ValueError, r"ratio must be in \(0, 1\], got -0.1"),
    (1.5, ValueError, r"ratio must be in \(0, 1\], got 1.5"),
    (float("nan"), ValueError, r"ratio must be in \(0, 1\], got nan"),
    (float("inf"), ValueError, r"ratio must be in \(0, 1\]"),
    ("0.1", TypeError, r"ratio must be a float.*str"),
    (None, TypeError, r"ratio must be a float"),
    (True, TypeError, r"ratio must be a float"),
  ],
)
def test_bad_ratio(factory, ratio, exc, match):
  with pytest.raises(exc, match=match):
    factory(ratio)


@pytest.mark.parametrize(
  "levels, exc, match",
  [
    (0, ValueError, r"levels.*\[1, 32767\], got 0"),
    (-3, ValueError, r"levels.*got -3"),
    (40000, ValueError, r"levels.*\[1, 32767\], got 40000"),
    (1.5, TypeError, r"levels.*must be an integer, got 1.5"),
    ("4", TypeError, r"levels.*must be an integer"),
    (True, TypeError, r"levels.*must be an integer"),
  ],
)
def test_bad_qsgd_levels(levels, exc, match):
  with pytest.raises(exc, match=match):
    C.qsgd(levels)


@pytest.mark.parametrize("dtype", [jnp.int32, np.uint8, jnp.bool_, jnp.complex64, "int8"])
def test_cast_needs_a_float_dtype(dtype):
  with pytest.raises(TypeError, match=r"cast\(dtype=\.\.\.\) needs a floating dtype"):
    C.cast(dtype)


def test_cast_not_a_dtype():
  with pytest.raises(TypeError, match="needs a floating dtype"):
    C.cast("not-a-dtype")


@pytest.mark.parametrize("name", _taking("granularity"))
@pytest.mark.parametrize("granularity", ["layer", "Leaf", "", None])
def test_bad_granularity(name, granularity):
  for kwargs in C.REGISTRY[name].examples:
    with pytest.raises(ValueError, match=r"granularity must be one of .*'leaf'.*'model'"):
      C.REGISTRY[name].factory(**{**kwargs, "granularity": granularity})


NOT_COMPRESSORS = [lambda x, key=None: x, "top_k", None, C.TopK]


@pytest.mark.parametrize(
  "transform",
  [cj.error_feedback, cj.compressed_mean, lambda c, **kw: cj.comp_ams(1e-3, c, **kw)],
  ids=["error_feedback", "compressed_mean", "comp_ams"],
)
@pytest.mark.parametrize("bad", NOT_COMPRESSORS, ids=["lambda", "str", "None", "class"])
def test_not_a_compressor(transform, bad):
  with pytest.raises(TypeError, match="expected a compams_jax Compressor"):
    transform(bad)


@pytest.mark.parametrize(
  "transform",
  [cj.error_feedback, cj.compressed_mean, lambda c, **kw: cj.comp_ams(1e-3, c, **kw)],
  ids=["error_feedback", "compressed_mean", "comp_ams"],
)
@pytest.mark.parametrize("axis_name", [3, ("data", 3), (), b"data"])
def test_bad_axis_name(transform, axis_name):
  with pytest.raises(TypeError, match=r"axis_name must be a str, a tuple of str or None, got"):
    transform(C.top_k(0.1), axis_name=axis_name)


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_bad_seed(seed):
  with pytest.raises(TypeError, match="seed must be an int"):
    cj.error_feedback(C.top_k(0.1), seed=seed)


@pytest.mark.parametrize(
  "leaf, dtype_name",
  [
    (jnp.zeros((3,), jnp.int32), "int32"),
    (jnp.zeros((2, 2), jnp.complex64), "complex64"),
    (jnp.zeros((4,), jnp.bool_), "bool"),
    (np.zeros((5,), np.uint8), "uint8"),
  ],
)
@pytest.mark.parametrize(
  "transform",
  [cj.error_feedback, cj.compressed_mean, lambda c: cj.comp_ams(1e-3, c)],
  ids=["error_feedback", "compressed_mean", "comp_ams"],
)
def test_init_rejects_non_float_leaves(transform, leaf, dtype_name):
  tx = transform(C.top_k(0.5))
  params = {"ok": jnp.zeros((3,)), "bad": leaf}
  with pytest.raises(TypeError, match=rf"real floating-point.*dtype {dtype_name}"):
    tx.init(params)


def test_compressed_mean_update_rejects_integer_grads():
  tx = cj.compressed_mean(C.top_k(0.5))
  state = tx.init({"w": jnp.zeros(4)})
  with pytest.raises(TypeError, match="dtype int32"):
    tx.update({"w": jnp.zeros(4, jnp.int32)}, state)


@pytest.mark.parametrize("name, kwargs", registry.cases())
@pytest.mark.parametrize(
  "transform",
  [cj.error_feedback, cj.compressed_mean, lambda c, **kw: cj.comp_ams(1e-3, c, **kw)],
  ids=["error_feedback", "compressed_mean", "comp_ams"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_unbound_axis_name(name, kwargs, transform, jit):
  tx = transform(registry.build(name, kwargs), axis_name="data")
  params = {"w": jnp.ones((10,))}
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=r"axis_name='data' is not bound"):
    update(params, state, params)


@pytest.mark.parametrize(
  "other",
  [
    {"w": jnp.ones(4), "extra": jnp.ones(2)},
    {"v": jnp.ones(4)},
    [jnp.ones(4)],
    {"w": [jnp.ones(4)]},
    {"w": None},
  ],
  ids=["extra-leaf", "renamed", "list", "nested", "none-leaf"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_error_feedback_update_structure_mismatch(other, jit):
  tx = cj.error_feedback(C.top_k(0.5))
  state = tx.init({"w": jnp.zeros(4)})
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match="pytree structure .* does not match"):
    update(other, state)


def test_comp_ams_update_structure_mismatch():
  tx = cj.comp_ams(1e-3, C.block_sign())
  state = tx.init({"w": jnp.zeros(4)})
  with pytest.raises(ValueError, match="does not match"):
    tx.update({"w": jnp.zeros(4), "b": jnp.zeros(1)}, state, {"w": jnp.zeros(4)})


@pytest.mark.parametrize("name, kwargs", registry.cases(where=lambda c: c.needs_key))
def test_randomized_compressor_without_key(name, kwargs):
  compressor = registry.build(name, kwargs)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    compressor.compress(jnp.ones(8))
  with pytest.raises(ValueError, match="needs a PRNG key"):
    C.compress_tree(compressor, {"w": jnp.ones(8)})


def test_wire_bytes_of_transform_rejects_integer_params():
  # compressed_mean validates its updates; so does wire_bytes' tracing of the update.
  with pytest.raises(TypeError, match="real floating-point"):
    cj.wire_bytes(cj.compressed_mean(C.top_k(0.1)), {"w": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize("bad", [lambda x: x, "top_k", 3])
def test_wire_bytes_rejects_non_compressor(bad):
  with pytest.raises(TypeError, match="wire_bytes expects a Compressor"):
    cj.wire_bytes(bad, {"w": jnp.zeros(3)})


@pytest.mark.parametrize(
  "same_structure_other_shape",
  [{"w": jnp.ones((1,))}, {"w": jnp.ones((2, 4))}],
  ids=["broadcastable-1", "rank-2"],
)
def test_error_feedback_update_shape_mismatch(same_structure_other_shape):
  tx = cj.error_feedback(C.top_k(0.5))
  state = tx.init({"w": jnp.zeros(4)})
  with pytest.raises(ValueError, match="shape"):
    tx.update(same_structure_other_shape, state)
