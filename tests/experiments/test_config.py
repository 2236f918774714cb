"""Configs through ml_collections' config_flags: files, `key=value` and `--config.key=value`
overrides, the library-default placeholders, and no jax in a config file or config.py."""

import pathlib
import subprocess
import sys

import pytest

from compams_jax.experiments import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DIGITS = str(CONFIGS / "digits.py")


def _one(*overrides, variant="comp_ams_top_k", spec=DIGITS):
  return config_lib.resolve(spec, list(overrides), [variant])[0]


def test_both_spellings_of_an_override_are_config_flags_overrides():
  plain = _one("optimizer.learning_rate=3e-3", "mesh.shape=(2, 4)", "epochs=2")
  flags = _one("--config.optimizer.learning_rate=3e-3", "--config.mesh.shape=(2, 4)", "epochs=2")
  assert plain.to_dict() == flags.to_dict()
  assert plain.optimizer.learning_rate == 3e-3 and plain.mesh.shape == (2, 4)


def test_values_are_parsed_by_the_field_type():
  c = _one(
    "optimizer.learning_rate=1",  # an int literal for a float field
    "optimizer.eps=1e-4",  # a library placeholder (None until set)
    "optimizer.error_feedback=False",
    "optimizer.compressor=block_sign",
    "optimizer.compressor_kwargs={'block_size': 256}",  # a whole section
    "lr_grid=(0.1, 0.2)",
    "target_train_loss=nan",  # a float, refused by validate
  )
  assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
  assert c.optimizer.eps == 1e-4 and c.optimizer.error_feedback is False
  assert c.optimizer.compressor == "block_sign"
  assert dict(c.optimizer.compressor_kwargs) == {"block_size": 256}
  assert c.lr_grid == (0.1, 0.2)
  with pytest.raises(config_lib.ConfigError, match="target_train_loss=nan"):
    config_lib.validate(c)


def test_kwargs_sections_take_new_keys_and_other_sections_do_not():
  c = _one("dataset.kwargs.path=/data/x", "optimizer.compressor_kwargs.value_dtype=bfloat16")
  assert dict(c.dataset.kwargs) == {"path": "/data/x"}
  assert dict(c.optimizer.compressor_kwargs) == {"ratio": 0.01, "value_dtype": "bfloat16"}
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'optimizer.ratio'"):
    _one("optimizer.ratio=0.1")
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'mesh.size'"):
    _one("--config.mesh.size=2")


def test_a_value_of_the_wrong_type_names_the_override():
  with pytest.raises(config_lib.ConfigError, match=r"^override epochs=1\.5: "):
    _one("epochs=1.5")
  with pytest.raises(config_lib.ConfigError, match="not of the form key=value"):
    _one("--config.epochs")


def test_overrides_apply_after_the_variant_preset():
  c = _one("optimizer.compressor_kwargs.ratio=0.05", variant="comp_ams_top_k")
  assert c.optimizer.compressor == "top_k" and c.optimizer.compressor_kwargs.ratio == 0.05
  # A preset's kwargs section takes keys the base config's lacks.
  q = _one("optimizer.compressor_kwargs.levels=8", variant="comp_ams_qsgd")
  assert dict(q.optimizer.compressor_kwargs) == {"levels": 8}


def test_library_fields_are_none_until_set():
  section = config_lib.optimizer_section()
  for field in ("b1", "b2", "eps", "momentum", "seed", "warmup_steps", "feedback", "wire"):
    assert section[field] is None, field
  config_lib.validate(_one())  # None is the library's default, not an impossible value


def test_a_config_file_argument_is_passed_to_get_config():
  assert config_lib.load_config_file(DIGITS + ":smoke").name == "digits_smoke"
  with pytest.raises(config_lib.ConfigError, match="unknown config variant 'nope'"):
    config_lib.load_config_file(DIGITS + ":nope")


def test_base_config_fields_use_dotted_keys_and_refuse_unknown_ones():
  c = config_lib.base_config(name="t", dataset="d", model="m", optimizer__learning_rate=0.5)
  assert c.optimizer.learning_rate == 0.5
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'optimizer.lr'"):
    config_lib.base_config(name="t", dataset="d", model="m", optimizer__lr=0.5)


def test_config_py_and_the_config_files_import_no_jax():
  """config.py loads on its own, and every config file through it, with jax unimportable."""
  code = f"""
import importlib.abc, importlib.util, pathlib, sys

class NoJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "optax", "flax", "compams_jax"):
      raise ImportError("imported " + name)

sys.meta_path.insert(0, NoJax())
name = "compams_jax.experiments.config"
spec = importlib.util.spec_from_file_location(name, {str(ROOT / "compams_jax/experiments/config.py")!r})
config = importlib.util.module_from_spec(spec)
sys.modules[name] = config
spec.loader.exec_module(config)
for path in sorted(pathlib.Path({str(CONFIGS)!r}).glob("*.py")):
  for spec in (str(path), str(path) + ":smoke"):
    for c in config.resolve(spec):
      config.validate(c)
print("loaded without jax")
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "loaded without jax" in done.stdout
