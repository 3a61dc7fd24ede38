"""Per-chip cost of a compiled step from its HLO text, with every loop counted by its trip count.

XLA's `compiled.cost_analysis()` counts the body of a `while` loop once. The train step has up to
three loops: the gradient-accumulation `lax.scan` over `optim.num_microbatches`, the vocabulary
chunks of `chunked_vocab` and (with `scan_layers`) the encoder layers, so its flops and bytes come
out too low by about those trip counts. `hlo_cost(compiled.as_text())` walks the optimized,
partitioned HLO module instead: every instruction is weighted by how many times its computation
runs (the product of the trip counts of the loops around it; a `while` condition
`i < constant(N)` gives N), and counts

- flops: 2 x multiply-adds of every `dot` and `convolution` (fused or not); convolutions with
  input dilation (how TPU expresses some batched matmuls) count only the taps that hit real input,
  as XLA's `HloCostAnalysis` does; elementwise work is not counted (matmuls dominate a BERT step);
- bytes: operand + result bytes of every instruction outside fused computations (a fusion reads its
  operands and writes its result once, the XLA cost model's approximation of memory traffic; an
  async `*-start` counts its result tuple, which holds source and destination; an operand that is
  only sliced counts the slices, an in-place `dynamic-update-slice` its update), with the TPU tile
  padding of each layout; `hbm_bytes` leaves out arrays XLA placed in on-chip memory;
- collectives: per op kind, the bytes a chip sends over the interconnect with ring algorithms:
  all-reduce 2(n-1)/n x S, all-gather (n-1)/n x result, reduce-scatter (n-1)/n x operand,
  all-to-all (n-1)/n x S, collective-permute S, for groups of n devices.

The numbers are per chip (the module is the SPMD program of one device). They are an estimate of
what runs, not a measurement: XLA may overlap, fuse or elide work the text does not show.
"""

from __future__ import annotations

import dataclasses
import math
import re

# Bytes per element of the HLO element types.
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 's32': 4,
                'u32': 4, 's64': 8, 'u64': 8, 'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8, 'c64': 8,
                'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'token': 0}
_ARRAY = re.compile(r'\b(' + '|'.join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r')\[([0-9,]*)\](\{[^}]*\})?')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$')
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_CALLS = re.compile(r'\b(calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)')
# No memory traffic of their own: views, tuples, control flow (their computations are walked).
_NO_BYTES = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'while', 'call',
             'conditional', 'after-all', 'partition-id', 'replica-id', 'opt-barrier',
             'add-dependency', 'iota'}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


@dataclasses.dataclass
class HloCost:
  """Per-chip totals of one execution of the module (loops counted by their trip counts).

  Attributes:
    flops: matmul/convolution FLOPs (2 per multiply-add).
    bytes_accessed: bytes read and written by top-level instructions, tile padding included (XLA's
      `bytes accessed` convention: on CPU equal to `cost_analysis()` for a loop-free module).
    hbm_bytes: the part of `bytes_accessed` in the default memory space (HBM on TPU/GPU): arrays
      XLA placed in another space (`S(1)`, TPU VMEM) left out.
    collective_bytes: `{op kind: bytes sent per chip}` (ring-algorithm estimate).
    collective_count: `{op kind: executions}`.
    loops: `[(body computation, trip count)]` of every `while` found, outermost first.
  """
  flops: float = 0.0
  bytes_accessed: float = 0.0
  hbm_bytes: float = 0.0
  collective_bytes: dict = dataclasses.field(default_factory=dict)
  collective_count: dict = dataclasses.field(default_factory=dict)
  loops: list = dataclasses.field(default_factory=list)

  @property
  def total_collective_bytes(self) -> float:
    """Bytes sent per chip by all collectives together."""
    return float(sum(self.collective_bytes.values()))


@dataclasses.dataclass
class _Instr:
  name: str
  type_str: str
  opcode: str
  operands: list
  attrs: str
  literal: str = ''  # a constant's value text, a parameter's number
  is_root: bool = False


def _split_type(rest: str) -> tuple[str, str]:
  """`'TYPE opcode(...)...'` -> `(TYPE, 'opcode(...)...')`; TYPE may be a nested tuple."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  i = 0
  depth = 0
  while i < len(rest):  # an array type: up to the first space outside {...} layouts
    ch = rest[i]
    depth += ch in '{[('
    depth -= ch in '}])'
    if ch == ' ' and depth == 0:
      break
    i += 1
  return rest[:i], rest[i:].lstrip()


def _operands(s: str) -> tuple[list, str, str]:
  """`'(%a, %b), attrs'` -> `(['a', 'b'], 'attrs', '%a, %b')` (nested parentheses skipped)."""
  depth, i = 0, 0
  for i, ch in enumerate(s):
    depth += ch == '('
    depth -= ch == ')'
    if depth == 0:
      break
  inner, attrs = s[1:i], s[i + 1:]
  return re.findall(r'%([\w.\-]+)', inner), attrs, inner


def array_shapes(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every array in an HLO type string: `[(dtype, dims)]` (a tuple type gives several)."""
  return [(d, dims) for d, dims, _ in _arrays(type_str)]


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...], str]]:
  out = []
  for dtype, dims, layout in _ARRAY.findall(re.sub(r'/\*.*?\*/', '', type_str)):
    out.append((dtype, tuple(int(d) for d in dims.split(',') if d), layout))
  return out


def _physical_elements(dims: tuple[int, ...], layout: str) -> int:
  """Elements of an array as laid out: its most-minor dimensions padded to the first tile.

  A TPU layout `{1,0:T(8,128)}` stores `f32[300,32]` as 304 x 128 elements (XLA's
  `HloCostAnalysis` counts these padded bytes on TPU); no tile means no padding.
  """
  m = re.match(r'\{([0-9,]*)(?::([^}]*))?\}', layout or '')
  tile = re.match(r'T\(([0-9,]*)\)', m.group(2) or '') if m else None
  if not m or not tile or not dims:
    return math.prod(dims) if dims else (max(1, math.prod(
        int(t) for t in tile.group(1).split(',') if t)) if tile else 1)
  order = [int(d) for d in m.group(1).split(',') if d] or list(range(len(dims)))[::-1]
  sizes = [int(t) for t in tile.group(1).split(',') if t]
  padded = list(dims)
  for t, d in zip(reversed(sizes), order):  # the last tile dimension pads the most-minor dim
    padded[d] = -(-padded[d] // t) * t
  return math.prod(padded)


def type_bytes(type_str: str, hbm_only: bool = False, padded: bool = True) -> float:
  """Bytes of all arrays in an HLO type string, tile padding included.

  Args:
    type_str: an HLO type, e.g. `(f32[8,128]{1,0:T(8,128)}, s32[])`.
    hbm_only: leave out arrays placed in another memory space (`S(n)` in the layout: on TPU
      `S(1)` is the on-chip VMEM), whose traffic does not touch HBM.
    padded: count the tile padding of the layout (memory); False counts the logical elements
      (what a collective sends).

  Returns:
    The bytes.
  """
  total = 0.0
  for dtype, dims, layout in _arrays(type_str):
    if hbm_only and re.search(r'S\([1-9]\d*\)', layout or ''):
      continue
    total += _DTYPE_BYTES[dtype] * (_physical_elements(dims, layout) if padded else math.prod(dims))
  return total


def parse_module(text: str) -> tuple[dict, str]:
  """`({computation: [_Instr]}, entry name)` of an HLO module's text."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.startswith('}'):
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    type_str, rest = _split_type(m.group(3))
    op = re.match(r'([\w\-]+)', rest)
    if not op:
      continue
    tail = rest[op.end():]
    operands, attrs, inner = _operands(tail) if tail.startswith('(') else ([], tail, '')
    comps[current].append(_Instr(m.group(2), type_str, op.group(1), operands, attrs,
                                 inner if op.group(1) in ('constant', 'parameter') else '',
                                 bool(m.group(1))))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _called(instr: _Instr) -> list[tuple[str, str]]:
  """`[(role, computation)]` an instruction calls (`body`, `condition`, `calls`, ...)."""
  out = []
  for role, names in _CALLS.findall(instr.attrs):
    for n in re.split(r'[,\s{}]+', names):
      n = n.strip().lstrip('%')
      if n:
        out.append((role, n))
  return out


def _trip_count(comps: dict, cond: str) -> int:
  """N of a loop condition `i < N` with a constant N (JAX's scan and fori_loop from 0).

  The compare may sit in a fusion the condition calls, with the constant passed in as an
  operand (CPU); fusion parameters are resolved to the caller's operands. 1 if none is found.
  """
  def walk(c, known):  # known: {instruction name in c: integer constant}
    for ins in comps.get(c, []):
      if ins.opcode == 'constant' and re.fullmatch(r'\s*-?\d+\s*', ins.literal):
        known[ins.name] = int(ins.literal)
      elif ins.opcode == 'compare':
        direction = re.search(r'direction=(\w+)', ins.attrs)
        if direction and direction.group(1) in ('LT', 'NE') and len(ins.operands) == 2:
          if ins.operands[1] in known:
            return known[ins.operands[1]]
      elif ins.opcode == 'fusion':
        callee = next((n for r, n in _called(ins) if r == 'calls'), None)
        params = {p.name: int(p.literal) for p in comps.get(callee, [])
                  if p.opcode == 'parameter' and p.literal.strip().isdigit()}
        inner = {name: known[ins.operands[k]] for name, k in params.items()
                 if k < len(ins.operands) and ins.operands[k] in known}
        found = walk(callee, inner)
        if found is not None:
          return found
    return None

  n = walk(cond, {})
  return max(int(n), 1) if n is not None else 1


def _conv_flops(ins: _Instr, shapes: dict) -> float:
  """2 x multiply-adds of a `convolution`, skipping taps on padding or input-dilation holes."""
  (_, out_dims), = array_shapes(ins.type_str)[:1] or [(None, ())]
  lhs = array_shapes(shapes.get(ins.operands[0], ''))
  rhs = array_shapes(shapes.get(ins.operands[1], ''))
  if not lhs or not rhs:
    return 0.0
  lhs_dims, rhs_dims = lhs[0][1], rhs[0][1]
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', ins.attrs)
  if not labels:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  window = re.search(r'window=\{([^}]*)\}', ins.attrs)
  win = {}
  if window:
    for item in window.group(1).split():
      k, v = item.split('=')
      win[k] = v
  spatial = [c for c in rhs_l if c not in 'io']
  n = len(spatial)

  def field(name, default):
    if name not in win:
      return [default] * n
    if name == 'pad':
      return [tuple(int(x) for x in p.split('_')) for p in win[name].split('x')]
    return [int(x) for x in win[name].split('x')]

  stride, pad = field('stride', 1), field('pad', (0, 0))
  lhs_dil, rhs_dil = field('lhs_dilate', 1), field('rhs_dilate', 1)
  valid = 1
  for d, label in enumerate(spatial):
    size_in = lhs_dims[lhs_l.index(label)]
    size_k = rhs_dims[rhs_l.index(label)]
    size_out = out_dims[out_l.index(label)]
    dilated = (size_in - 1) * lhs_dil[d] + 1
    count = 0
    for k in range(size_k):
      off = k * rhs_dil[d] - pad[d][0]
      if lhs_dil[d] == 1 and stride[d] == 1:  # contiguous: count in closed form
        lo, hi = max(0, -off), min(size_out, dilated - off)
        count += max(0, hi - lo)
        continue
      for o in range(size_out):
        pos = o * stride[d] + off
        if 0 <= pos < dilated and pos % lhs_dil[d] == 0:
          count += 1
    valid *= count
  fgc = int(re.search(r'feature_group_count=(\d+)', ins.attrs).group(1)) if (
      'feature_group_count' in ins.attrs) else 1
  in_feature = lhs_dims[lhs_l.index('f')]
  out_feature = out_dims[out_l.index('f')]
  batch = out_dims[out_l.index('b')]
  return 2.0 * (in_feature // fgc) * out_feature * batch * valid


def _dot_flops(ins: _Instr, shapes: dict) -> float:
  """2 x multiply-adds of a `dot`: result elements x contracted size."""
  out = array_shapes(ins.type_str)
  lhs = array_shapes(shapes.get(ins.operands[0], ''))
  if not out or not lhs:
    return 0.0
  m = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', ins.attrs)
  dims = [int(d) for d in m.group(1).split(',') if d] if m else []
  return 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][d] for d in dims)


_SLICING = ('dynamic-slice', 'slice', 'gather')


def _instr_bytes(ins: _Instr, shapes: dict, comps: dict, hbm_only: bool) -> float:
  """Bytes a top-level instruction reads and writes (XLA's operand-utilization convention).

  Operands only sliced (`dynamic-slice`, `slice`, `gather`: in a loop, a layer's params out of
  the stacked ones) count the slices read; a `dynamic-update-slice` writes its update in place
  into its buffer (the scan's stacked outputs), so neither counts that whole buffer.
  """
  size = lambda t: type_bytes(t, hbm_only=hbm_only)
  op = ins.opcode
  if op.endswith('-start'):  # the result tuple holds source and destination
    return size(ins.type_str)
  if op in _SLICING:
    return 2 * size(ins.type_str) + sum(size(shapes.get(o, '')) for o in ins.operands[1:])
  if op == 'dynamic-update-slice':
    return 2 * size(shapes.get(ins.operands[1], '')) if len(ins.operands) > 1 else 0.0
  if op != 'fusion':
    return size(ins.type_str) + sum(size(shapes.get(o, '')) for o in ins.operands)
  callee = next((n for r, n in _called(ins) if r == 'calls'), None)
  body = comps.get(callee, [])
  inner = {i.name: i.type_str for i in body}
  params = {int(i.literal): i.name for i in body
            if i.opcode == 'parameter' and i.literal.strip().isdigit()}
  users = {}
  for i in body:
    for k, o in enumerate(i.operands):
      users.setdefault(o, []).append((i, k))
  total = 0.0
  for k, o in enumerate(ins.operands):
    uses = users.get(params.get(k), [])
    if uses and all(u.opcode in _SLICING and j == 0 or u.opcode == 'dynamic-update-slice' and j == 0
                    for u, j in uses):
      total += sum(size(u.type_str) for u, j in uses if u.opcode in _SLICING)
    else:
      total += size(shapes.get(o, ''))
  root = body[-1] if body else None
  for i in body:
    if i.is_root:
      root = i
  outs = [root]
  if root is not None and root.opcode == 'tuple':
    by_name = {i.name: i for i in body}
    outs = [by_name.get(o) for o in root.operands]
  if root is None or any(x is None for x in outs) or not any(
      x.opcode == 'dynamic-update-slice' for x in outs):
    return total + size(ins.type_str)
  for x in outs:  # in place: a dynamic-update-slice writes only its update
    total += size(inner.get(x.operands[1], '')) if x.opcode == 'dynamic-update-slice' else size(
        x.type_str)
  return total


def _group_size(ins: _Instr, num_devices: int) -> int:
  """Devices per replica group of a collective."""
  a = ins.attrs
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", a)
  if m:
    sizes = dict((k.strip("' "), int(v)) for k, v in
                 (kv.split('=') for kv in m.group(1).split(',')))
    return math.prod(sizes[k.strip("' ")] for k in m.group(2).split(',') if k.strip("' "))
  m = re.search(r'replica_groups=\[([0-9,]+)\]<=', a)
  if m:
    return int(m.group(1).split(',')[-1])
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', a)
  if m:
    return max(1, len([x for x in m.group(1).split(',') if x]))
  if ins.opcode.startswith('collective-permute'):
    return 2
  return num_devices


def hlo_cost(text: str, num_devices: int = 1, retrip: tuple[int, int] | None = None) -> HloCost:
  """The per-chip cost of one execution of a compiled module (module docstring).

  Args:
    text: `compiled.as_text()` (optimized HLO; `lowered.as_text(dialect='hlo')` works too, but
      is not yet partitioned).
    num_devices: devices of the program (the group size of collectives without replica groups).
    retrip: `(n, m)`: cost the loops of the ENTRY computation that run n times as if they ran m
      times (the train step compiled with n microbatches, costed for m).

  Returns:
    The `HloCost`.

  Raises:
    ValueError: the text has no ENTRY computation.
  """
  comps, entry = parse_module(text)
  # Call graph: caller -> [(callee, runs per caller run)]. HLO computations form a DAG.
  edges, no_bytes = {}, set()
  cost = HloCost()
  for c, instrs in comps.items():
    for ins in instrs:
      called = _called(ins)
      trips = 1
      if ins.opcode == 'while':
        cond = next((n for r, n in called if r == 'condition'), None)
        trips = _trip_count(comps, cond) if cond else 1
        if retrip and c == entry and trips == retrip[0]:
          trips = retrip[1]
        cost.loops.append((next((n for r, n in called if r == 'body'), None), trips))
      for role, n in called:
        if n not in comps:
          continue
        edges.setdefault(c, []).append((n, trips if role in ('body', 'condition') else 1))
        if role == 'to_apply' or (role == 'calls' and ins.opcode == 'fusion'):
          no_bytes.add(n)  # fused or scalar reducer computations: their caller moves the bytes
  weight, indegree = {c: 0.0 for c in comps}, {c: 0 for c in comps}
  for c in comps:
    for n, _ in edges.get(c, []):
      indegree[n] += 1
  weight[entry] = 1.0
  ready = [c for c in comps if indegree[c] == 0]
  while ready:  # topological order: a computation's weight is final before it is propagated
    c = ready.pop()
    for n, factor in edges.get(c, []):
      weight[n] += weight[c] * factor
      indegree[n] -= 1
      if indegree[n] == 0:
        ready.append(n)
  fused = no_bytes
  for c, w in weight.items():
    if not w:
      continue
    instrs = comps.get(c, [])
    shapes = {ins.name: ins.type_str for ins in instrs}
    for ins in instrs:
      op = ins.opcode
      if op.endswith('-done'):  # the bytes of an async pair are counted at its start
        continue
      if op == 'convolution':
        cost.flops += w * _conv_flops(ins, shapes)
      elif op == 'dot':
        cost.flops += w * _dot_flops(ins, shapes)
      if c not in fused and op not in _NO_BYTES:
        for hbm in (False, True):
          b = w * _instr_bytes(ins, shapes, comps, hbm)
          if hbm:
            cost.hbm_bytes += b
          else:
            cost.bytes_accessed += b
      kind = next((k for k in COLLECTIVES if op in (k, k + '-start')), None)
      if kind:
        n = _group_size(ins, num_devices)
        operand = sum(type_bytes(shapes.get(o, ''), padded=False) for o in ins.operands)
        result = type_bytes(ins.type_str, padded=False)
        if op.endswith('-start'):  # (operands, results[, contexts]) tuple: the results half
          result = operand if kind != 'all-gather' else result - operand
        frac = (n - 1) / n if n > 1 else 0.0
        sent = {'all-reduce': 2 * frac * operand, 'all-gather': frac * result,
                'reduce-scatter': frac * operand, 'all-to-all': frac * operand,
                'collective-permute': operand}[kind]
        cost.collective_bytes[kind] = cost.collective_bytes.get(kind, 0.0) + w * sent
        cost.collective_count[kind] = cost.collective_count.get(kind, 0) + w
  return cost
