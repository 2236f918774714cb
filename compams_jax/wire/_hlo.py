"""Bytes moved by collectives, read from a compiled XLA HLO module."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "f8e4m3": 1,
  "f8e5m2fnuz": 1,
  "f8e4m3fnuz": 1,
  "f8e4m3b11fnuz": 1,
  "f8e3m4": 1,
  "f8e8m0fnu": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "s4": 0.5,
  "u4": 0.5,
  "s2": 0.25,
  "u2": 0.25,
  "s1": 0.125,
  "u1": 0.125,
  "token": 0,
}

# Collective opcodes; for async pairs only the "-start" half is counted.
COLLECTIVES = (
  "all-gather",
  "all-reduce",
  "all-to-all",
  "reduce-scatter",
  "collective-permute",
  "collective-broadcast",
  "ragged-all-to-all",
)

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_GROUPS_EXPLICIT_RE = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")


def shape_bytes(type_str: str) -> int:
  """Bytes of every array in an HLO type string (arrays or tuples of arrays)."""
  total = 0.0
  for dtype, dims in _ARRAY_RE.findall(type_str):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def _split_type(rest: str) -> tuple[str, str]:
  """Splits 'TYPE opcode(...)...' into (TYPE, remainder), handling tuple types."""
  rest = rest.strip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].strip()
  head, _, tail = rest.partition(" ")
  return head, tail.strip()


def _operands(call: str) -> list[str]:
  """Operand texts of 'opcode(a, b, ...)...' split at depth-0 commas."""
  start = call.index("(")
  depth, cur, out = 0, [], []
  for ch in call[start:]:
    if ch in "({[":
      depth += 1
      if depth == 1:
        continue
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        out.append("".join(cur).strip())
        break
    if ch == "," and depth == 1:
      out.append("".join(cur).strip())
      cur = []
    else:
      cur.append(ch)
  return [o for o in out if o]


def _group_size(line: str) -> int | None:
  m = _GROUPS_EXPLICIT_RE.search(line)
  if m:
    return len([g for g in m.group(1).split(",") if g])
  m = _GROUPS_IOTA_RE.search(line)
  if m:
    return int(m.group(2))
  m = _GROUPS_MESH_RE.search(line)
  if m:
    # replica_groups=mesh['axis_0'=4,'axis_1'=1,...], device_ids=(...) {'axis_0', ...}: the
    # groups span the named axes of that mesh.
    sizes = {name: int(size) for name, size in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", m.group(2)))
  return None


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled module (per-device view)."""

  opcode: str
  operand_bytes: int
  result_bytes: int
  group_size: int | None

  @property
  def received_bytes(self) -> float:
    """Bytes one device receives under the standard algorithm for this collective.

    With S the operand bytes and n the group size: ring all-reduce 2(n−1)/n·S; all-gather
    (n−1)·S; all-to-all and reduce-scatter (n−1)/n·S; collective-permute and broadcast S.
    """
    n = self.group_size or 1
    s = self.operand_bytes
    if self.opcode == "all-reduce":
      return 2 * (n - 1) / n * s
    if self.opcode == "all-gather":
      return (n - 1) * s
    if self.opcode in ("all-to-all", "reduce-scatter", "ragged-all-to-all"):
      return (n - 1) / n * s
    return float(s)


@dataclasses.dataclass(frozen=True)
class CollectiveBytes:
  """What the collectives of one compiled program move, per device.

  Attributes:
    collectives: every collective instruction found.
    total: sum of the operand bytes of all collectives (what each device hands to XLA).
    received: bytes each device receives under the standard algorithms (see `Collective`).
    by_op: operand bytes per opcode.
  """

  collectives: tuple[Collective, ...]

  @property
  def total(self) -> int:
    return sum(c.operand_bytes for c in self.collectives)

  @property
  def by_op(self) -> dict[str, int]:
    out: dict[str, int] = collections.defaultdict(int)
    for c in self.collectives:
      out[c.opcode] += c.operand_bytes
    return dict(out)

  @property
  def received(self) -> float:
    """Bytes one device receives per call, under the standard algorithm of each collective."""
    return sum(c.received_bytes for c in self.collectives)

  @property
  def count(self) -> int:
    return len(self.collectives)


def parse_collectives(hlo_text: str) -> CollectiveBytes:
  """Finds every collective in HLO text and the bytes of its operands."""
  shapes: dict[str, str] = {}
  calls: list[tuple[str, str, str]] = []
  for line in hlo_text.splitlines():
    m = _DEF_RE.match(_COMMENT_RE.sub("", line))
    if not m:
      continue
    name, rest = m.groups()
    type_str, call = _split_type(rest)
    shapes[name] = type_str
    opcode = call.split("(", 1)[0].strip()
    base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
    if base in COLLECTIVES and "(" in call:
      calls.append((base, type_str, call))
  found = []
  for opcode, type_str, call in calls:
    operand_bytes = 0
    for operand in _operands(call):
      if _ARRAY_RE.search(operand):  # Older format: the operand's type is printed inline.
        operand_bytes += shape_bytes(operand)
      else:
        operand_bytes += shape_bytes(shapes.get(operand.lstrip("%"), ""))
    found.append(Collective(opcode, operand_bytes, shape_bytes(type_str), _group_size(call)))
  return CollectiveBytes(tuple(found))


def collective_bytes(fn: Callable[..., Any] | Any, *args: Any, **kwargs: Any) -> CollectiveBytes:
  """Bytes per device moved by the collectives of a compiled program, read from its HLO.

  Args:
    fn: a function (it is jitted), a `jax.stages.Lowered`/`Compiled`, or HLO text.
    *args: example arguments for `fn` (arrays or ShapeDtypeStructs).
    **kwargs: keyword arguments for `fn`.

  Returns:
    A `CollectiveBytes` with every collective's operand bytes as XLA will send them.

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
    >>> cj.collective_bytes(f, jnp.zeros((jax.device_count(), 256))).total
    1024
  """
  if isinstance(fn, str):
    return parse_collectives(fn)
  if isinstance(fn, jax.stages.Compiled):
    return parse_collectives(fn.as_text())
  if isinstance(fn, jax.stages.Lowered):
    return parse_collectives(fn.compile().as_text())
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return parse_collectives(jitted.lower(*args, **kwargs).compile().as_text())
