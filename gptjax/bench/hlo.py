"""XLA's optimized HLO text, read: the computations and their instructions, and what a GPU program launches (kernels,
library calls), its GEMMs with operand dtypes and shapes, scatters, buffers, and each launch's FLOPs and bytes.

Pure Python over `compiled.as_text()`; gptjax.bench.inspect compiles the programs it reads.
"""

from __future__ import annotations

import collections
import math
import re

BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
         "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
# Instructions that launch nothing: bookkeeping, and control flow whose bodies are read in their own right.
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
               "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency"}


def _balanced(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] in "([{":
            depth += 1
        elif s[j] in ")]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """'bf16[16,1024]{1,0}' or a tuple of them -> [(dtype, dims)]."""
    return [(d, tuple(int(x) for x in dims.split(",") if x))
            for d, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape) if d in BYTES]


def nbytes(arrs) -> int:
    return sum(BYTES[d] * math.prod(dims) for d, dims in arrs)


class Instruction:
    __slots__ = ("name", "shape", "op", "operands", "inner", "attrs", "root", "arrays")

    def __init__(self, name: str, shape: str, op: str, inner: str, attrs: str, root: bool = False):
        """inner: the text between the opcode's parentheses (a parameter's index); operands: the names in it."""
        self.name, self.shape, self.op, self.inner, self.attrs, self.root = name, shape, op, inner, attrs, root
        self.operands = re.findall(r"%([\w.\-]+)", inner)
        self.arrays = arrays(shape)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-$]+|\"[^\"]*\")", self.attrs)
        return None if m is None else m.group(1).strip('"').lstrip("%")

    def dims(self, key: str) -> list[int]:
        """A dimension-number list, as an attribute (lhs_contracting_dims={1}) or in a backend config's JSON
        ("lhs_contracting_dimensions":["1"])."""
        m = re.search(rf"{key}=\{{([\d,]*)\}}", self.attrs) or re.search(rf'"{key}":\[([^\]]*)\]', self.attrs)
        return [int(x.strip('" ')) for x in m.group(1).split(",") if x.strip('" ')] if m else []


def parse(text: str) -> dict[str, dict[str, Instruction]]:
    """computation name -> {instruction name -> Instruction}, in program order; the ENTRY computation as 'ENTRY'."""
    comps, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) \(.*\{\s*$", line)
        if head:
            current = comps.setdefault("ENTRY" if head.group(1) else head.group(2), {})
            continue
        if line.startswith("}"):
            current = None
            continue
        m = re.match(r"^\s*(ROOT )?%(\S+) = (.*)$", line)
        if current is None or m is None:
            continue
        root, name, rest = m.groups()
        end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        op = rest[:rest.index("(")]
        close = _balanced(rest, len(op))
        current[name] = Instruction(name, shape, op, rest[len(op) + 1:close - 1], rest[close:], bool(root))
    return comps


def control(comps) -> dict[str, int]:
    """The computations whose instructions are launched (ENTRY and the bodies of its loops and branches) -> how
    many times one run of the program runs them: a loop's body its known trip count times (1 when unknown)."""
    runs, todo = {}, [("ENTRY", 1)]
    while todo:
        c, n = todo.pop()
        if c in runs or c not in comps:
            continue
        runs[c] = n
        for inst in comps[c].values():
            if inst.op in ("while", "conditional", "call"):
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
                for key in ("body", "condition", "to_apply", "true_computation", "false_computation"):
                    if inst.attr(key):
                        todo.append((inst.attr(key), n * (int(trip.group(1)) if trip and key == "body" else 1)))
                for branch in re.findall(r"branch_computations=\{([^}]*)\}", inst.attrs):
                    todo += [(b.strip().lstrip("%"), n) for b in branch.split(",")]
    return runs


def fusion_kind(inst: Instruction) -> str:
    """A fusion's kind as the GPU backend names it: the backend config's kind (__triton_nested_gemm_fusion, ...) for
    custom fusions, else kLoop/kInput/kOutput."""
    m = re.search(r'"kind":"([^"]+)"', inst.attrs)
    return m.group(1) if m else (inst.attr("kind") or "?")


def gemm(inst: Instruction, shapes: dict, where: str) -> dict:
    """One GEMM (a dot, or a cuBLAS call): operand and result (dtype, dims), its M/N/K dimensions, FLOPs, where."""
    lhs, rhs = (shapes[o][0] for o in inst.operands[:2])
    out = inst.arrays[0]
    contract = inst.dims("lhs_contracting_dims") or inst.dims("lhs_contracting_dimensions")
    k = math.prod(lhs[1][i] for i in contract) if contract else lhs[1][-1]
    batch = {side: set(inst.dims(f"{side}_batch_dims") or inst.dims(f"{side}_batch_dimensions"))
             for side in ("lhs", "rhs")}
    mnk = [d for side, (_, shape) in (("lhs", lhs), ("rhs", rhs)) for i, d in enumerate(shape) if i not in batch[side]]
    return {"lhs": lhs, "rhs": rhs, "out": out, "flops": 2 * math.prod(out[1]) * k, "where": where, "dims": mnk}


def attention_flops(inst: Instruction, shapes: dict) -> int:
    """A cuDNN attention call's matmul FLOPs: 2 GEMMs forward, 5 backward (recomputed scores, dV, dP, dQ, dK), each
    2·B·H·T·S·K for q [B, T, H, K] and k [B, S, H, K], halved under a causal mask (an approximation when S > T)."""
    q, k = (shapes.get(o) for o in (inst.operands + ["", ""])[:2])
    if not q or not k or len(q[0][1]) != 4 or len(k[0][1]) != 4:
        return 0
    (B, T, H, K), S = q[0][1], k[0][1][1]
    gemms = 5 if "Backward" in inst.attrs else 2
    return int(gemms * 2 * B * H * T * S * K * (0.5 if "CAUSAL" in inst.attrs else 1.0))


def results(inst: Instruction) -> list[tuple[str, tuple[int, ...]]]:
    """What an instruction produces, without the scratch space a library call returns as its last tuple element
    (cuBLAS's and cuDNN's s8/u8 workspace)."""
    library = inst.op == "custom-call" and (inst.attr("custom_call_target") or "").startswith(("__cublas", "__cudnn"))
    if library and len(inst.arrays) > 1 and inst.arrays[-1][0] in ("s8", "u8"):
        return inst.arrays[:-1]
    return inst.arrays


def shape_text(inst: Instruction) -> str:
    """The result's shape without layouts: 'bf16[16384,50304]', or a tuple '(f32[6,64], s32[])'."""
    return re.sub(r"\{[^}]*\}", "", inst.shape)[:160]


def fusion_bytes(inst: Instruction, comps, shapes: dict) -> int:
    """Bytes a fusion reads and writes: its operands and results, except that a buffer it updates in place
    (dynamic-update-slice) counts as the update only, and an operand it only slices (dynamic-slice) as the slices."""
    body = comps.get(inst.attr("calls") or "", {})
    param = {int(i.inner): i.name for i in body.values() if i.op == "parameter" and i.inner.isdigit()}
    users = collections.defaultdict(list)
    for i in body.values():
        for o in i.operands:
            users[o].append(i)
    read = 0
    for idx, operand in enumerate(inst.operands):
        name, uses = param.get(idx), users.get(param.get(idx), [])
        if uses and all(u.op == "dynamic-update-slice" and u.operands[0] == name for u in uses):
            continue  # a buffer updated in place: only the update is written (below)
        if uses and all(u.op == "dynamic-slice" and u.operands[0] == name for u in uses):
            read += sum(nbytes(u.arrays) for u in uses)
        else:
            read += nbytes(shapes.get(operand, []))
    root = next((i for i in body.values() if i.root), None)
    if root is None:
        return read + nbytes(inst.arrays)
    outs = [body[o] for o in root.operands if o in body] if root.op == "tuple" else [root]
    return read + sum(nbytes(body[o.operands[1]].arrays) if o.op == "dynamic-update-slice" and o.operands[1] in body
                      else nbytes(o.arrays) for o in outs)


def analyse(text: str, vocab_sizes: tuple[int, ...], tokens: int) -> dict:
    """What an optimized program holds: the kernels it launches by kind, every GEMM, the scatters, each launch's
    FLOPs (GEMMs and cuDNN attention) and bytes (fusion_bytes) with how many times a run launches it, and the float32
    buffers with a vocabulary-sized dimension of at least tokens x vocabulary elements (logits-sized)."""
    comps = parse(text)
    shapes = {i.name: results(i) for body in comps.values() for i in body.values()}  # names are module-unique
    caller = {}  # fused computation -> the kind of the fusion that calls it (nested ones inherit it)
    for body in comps.values():
        for i in body.values():
            if i.op == "fusion" and i.attr("calls"):
                caller[i.attr("calls")] = fusion_kind(i)
    changed = True
    while changed:
        changed = False
        for cname in [c for c in comps if c in caller]:
            for i in comps[cname].values():
                sub = i.attr("calls") or i.attr("to_apply")
                if sub and sub not in caller:
                    caller[sub], changed = caller[cname], True

    gemms, scatters, flops_in = [], [], collections.Counter()  # flops_in: fused computation -> its dots' FLOPs
    for cname, body in comps.items():
        for i in body.values():
            target = (i.attr("custom_call_target") or "") if i.op == "custom-call" else ""
            if i.op == "dot" or target.startswith("__cublas"):
                g = gemm(i, shapes, target or caller.get(cname, "unfused dot"))
                gemms.append(g)
                flops_in[cname] += g["flops"]
            elif i.op == "scatter":
                m = re.search(r'op_name="([^"]*)"', i.attrs)
                scatters.append({"out": i.arrays[0], "op_name": m.group(1) if m else ""})

    def fused_flops(comp: str) -> int:
        total, todo, seen = 0, [comp], set()
        while todo:
            c = todo.pop()
            if c not in seen and c in comps:
                seen.add(c)
                total += flops_in[c]
                todo += [i.attr("calls") for i in comps[c].values() if i.op == "fusion" and i.attr("calls")]
        return total

    kinds, launches = collections.Counter(), []
    for cname, runs in control(comps).items():
        for i in comps[cname].values():
            if i.op in NOT_KERNELS:
                continue
            if i.op == "fusion":
                kind, flops, moved = fusion_kind(i), fused_flops(i.attr("calls") or ""), fusion_bytes(i, comps, shapes)
            else:
                kind = (i.attr("custom_call_target") or "custom-call") if i.op == "custom-call" else i.op
                flops = (gemm(i, shapes, kind)["flops"] if kind.startswith("__cublas")
                         else attention_flops(i, shapes) if kind.startswith("__cudnn$fmha") else 0)
                moved = sum(nbytes(shapes.get(o, [])) for o in i.operands) + nbytes(shapes[i.name])
            kinds[kind] += 1
            launches.append({"name": i.name, "kind": kind, "shape": shape_text(i), "out_bytes": nbytes(shapes[i.name]),
                             "bytes": moved, "flops": flops, "arrays": shapes[i.name], "runs": runs})
    logits_sized = [x for x in launches for d, dims in x["arrays"]
                    if d == "f32" and set(dims) & set(vocab_sizes) and math.prod(dims) >= tokens * min(vocab_sizes)]
    return {"kernels": dict(kinds), "launches": launches, "gemms": gemms, "scatters": scatters,
            "logits_sized_f32": [{"name": x["name"], "kind": x["kind"], "shape": x["shape"]} for x in logits_sized]}
