"""An independent reader of docs/spec.md (sections 2-8), for tests.

Written from the spec's text only, with the standard library and xxhash; no vgs_ckpt
code, no torch. It reads a safetensors vector as stored and returns the record that
conformance/manifest.json holds for it (spec appendix B): the outcome, and for a
file it accepts the header members and the decoded tree in the decoded-tree form.
"""

from __future__ import annotations

import json
import math
import re
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import xxhash

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8,
         "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "C64": 8, "F8_E4M3": 1,
         "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1}
NOT_NUMPY = {"BF16", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"}
FLOATS = {"F16", "BF16", "F32", "F64", "C64", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2",
          "F8_E5M2FNUZ"}
KNOWN = ("v1_policy_only", "v2_full_parameters")
VGS_VERSIONS = ("1.0", "2.0", "3.0", "3.1", "3.2")
SUMMARY = ("enabled", "beta", "alpha", "eps", "warmup_steps", "step_count",
           "min_scaling_factor", "variance_cap", "param_grad_mean_ema", "param_grad_sq_ema",
           "param_numel", "grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema",
           "vgs_version")
PER_PARAMETER = ("param_grad_mean_ema", "param_grad_sq_ema", "param_numel")
STATS = ("grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema")
TAGS = {"float": {"float"}, "dict": {"dict", "ordered"}, "list": {"list"},
        "tuple": {"tuple"}, "tensor": {"tensor", "requires_grad", "parameter"},
        "ndarray": {"ndarray"}, "npscalar": {"npscalar"}}


class Refused(Exception):
    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


def bad(why: str, kind: str = "FormatError") -> Refused:
    return Refused(kind, why)


# -- rule 2.2: JSON -----------------------------------------------------------------------

def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise bad("duplicate member")
    return dict(pairs)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise bad("overflow")
    return value


def _constant(name: str) -> None:
    raise bad(f"constant {name}")


def parse(raw: bytes | str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_pairs, parse_float=_float,
                           parse_constant=_constant)
    except Refused:
        raise
    except (ValueError, RecursionError) as exc:
        raise bad(f"not JSON: {exc}") from None
    depth, level = 0, [value]
    while level:
        level = [v for v in level if isinstance(v, dict | list)]
        if level:
            depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    if depth > 512:
        raise bad("nested too deep")
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("lone surrogate") from None
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return value


# -- types of section 4 -------------------------------------------------------------------

def is_int(v: Any) -> bool:
    return type(v) is int


def is_number(v: Any) -> bool:
    return type(v) in (int, float)


def text(v: Any, empty: bool = False) -> bool:
    return type(v) is str and (empty or v != "")


STAMP = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                   r"(\.[0-9]+)?([Zz]|([+-])([0-9]{2}):([0-9]{2}))")


def timestamp(v: Any) -> str:
    match = STAMP.fullmatch(v) if type(v) is str else None
    if not match:
        raise bad("timestamp")
    y, mo, d, h, mi, sec = (int(g) for g in match.groups()[:6])
    frac, zone, sign, oh, om = match.groups()[6:]
    if sec > 59 or h > 23 or mi > 59:
        raise bad("time out of range")
    offset = timedelta(0)
    if zone not in ("Z", "z"):
        if int(oh) > 23 or int(om) > 59:
            raise bad("offset")
        offset = (1 if sign == "+" else -1) * timedelta(hours=int(oh), minutes=int(om))
    micro = int((frac or ".0")[1:7].ljust(6, "0"))
    try:
        when = datetime(y, mo, d, h, mi, sec, micro, timezone(offset)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise bad("date out of range") from None
    out = when.strftime("%Y-%m-%dT%H:%M:%S")
    out = f"{when.year:04d}{out[out.index('-'):]}"
    return f"{out}.{when.microsecond:06d}Z" if when.microsecond else f"{out}Z"


def need(condition: bool, why: str) -> None:
    if not condition:
        raise bad(why)


def number_or_null(v: Any) -> float | None:
    need(v is None or is_number(v), "number")
    return None if v is None else float(v)


def read_header_members(h: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The header's members with defaults, checked (section 4)."""
    need("step" in h and is_int(h["step"]) and h["step"] >= 0, "step")
    out: dict[str, Any] = {"format_version": fmt, "step": h["step"],
                           "performance": number_or_null(h.get("performance"))}
    member = h.get("member_id")
    need(member is None or text(member), "member_id")
    out["member_id"] = member
    producer = h.get("producer")
    need(type(producer) is dict and text(producer.get("name"))
         and text(producer.get("version")), "producer")
    out["producer"] = {"name": producer["name"], "version": producer["version"]}
    need("created_at" in h, "created_at")
    out["created_at"] = timestamp(h["created_at"])
    prov = h.get("provenance")
    if prov is not None:
        need(type(prov) is dict and text(prov.get("original_format"))
             and prov.get("original_container") in ("safetensors", "torch-zip",
                                                    "torch-pickle"), "provenance")
        version = prov.get("original_vgs_version")
        steps = prov.get("applied_steps", [])
        absent = prov.get("vgs_state_absent", False)
        legacy = prov.get("legacy", {})
        need(version is None or text(version, empty=True), "original_vgs_version")
        need(type(steps) is list and all(text(s, empty=True) for s in steps), "steps")
        need(type(absent) is bool and type(legacy) is dict, "provenance members")
        prov = {"original_format": prov["original_format"],
                "original_container": prov["original_container"],
                "original_vgs_version": version, "applied_steps": steps,
                "vgs_state_absent": absent, "legacy": legacy}
    out["provenance"] = prov
    if fmt == "v1_policy_only":
        flag = h.get("has_optimizer_state", False)
        need(type(flag) is bool, "has_optimizer_state")
        out["has_optimizer_state"] = flag
    else:
        hyper = h.get("hyperparams", {})
        need(type(hyper) is dict, "hyperparams")
        out["hyperparams"] = hyper
        lineage = h.get("lineage", {})
        need(type(lineage) is dict, "lineage")
        source = lineage.get("exploited_from")
        if source is not None:
            need(type(source) is dict and text(source.get("member_id"))
                 and is_int(source.get("step")) and source["step"] >= 0, "exploit source")
            file = source.get("file")
            need(file is None or type(file) is str, "file")
            source = {"member_id": source["member_id"], "step": source["step"],
                      "performance": number_or_null(source.get("performance")),
                      "file": file}
        out["lineage"] = {"exploited_from": source}
    return out


# -- sections 5 and 6: the tree -----------------------------------------------------------

def segment(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


class Tree:
    def __init__(self, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
        self.entries = entries
        self.kinds: dict[str, str] = {}
        self.first: dict[str, str] = {}
        self.objects: dict[tuple[Any, ...], int] = {}

    def form(self, node: Any, path: tuple[str | int, ...]) -> Any:
        if node is None or type(node) in (bool, int, str):
            return node
        need(type(node) is dict and len(node) > 0, "node")
        tags = [t for t in TAGS if t in node]
        need(len(tags) == 1 and set(node) <= TAGS[tags[0]], "node members")
        for flag in ("ordered", "requires_grad", "parameter"):
            need(node.get(flag, True) is True, "flag")
        tag = tags[0]
        if tag in ("dict", "list", "tuple"):
            need(len(path) < 64, "tree too deep")
            need(type(node[tag]) is list, "items")
        if tag == "dict":
            pairs, keys = [], []
            for pair in node["dict"]:
                need(type(pair) is list and len(pair) == 2
                     and type(pair[0]) in (str, int), "pair")
                need(all(not (k == pair[0] and type(k) is type(pair[0])) for k in keys),
                     "duplicate key")
                keys.append(pair[0])
                pairs.append([pair[0], self.form(pair[1], (*path, pair[0]))])
            out: dict[str, Any] = {"dict": pairs}
            if node.get("ordered"):
                out["ordered"] = True
            return out
        if tag in ("list", "tuple"):
            return {tag: [self.form(c, (*path, i)) for i, c in enumerate(node[tag])]}
        if tag == "float":
            value = node["float"]
            if type(value) is str:
                need(value in ("nan", "inf", "-inf"), "float string")
                return {"float": value}
            need(is_number(value), "float")
            return {"float": float(value)}
        name = node[tag]
        need(type(name) is str and name in self.entries, "reference")
        self.first.setdefault(name, "/".join(segment(k) for k in path))
        dtype, shape, data = self.entries[name]
        kind = "torch" if tag == "tensor" else "numpy"
        need(self.kinds.setdefault(name, kind) == kind, "torch and numpy")
        if kind == "numpy":
            need(dtype not in NOT_NUMPY, "numpy dtype")
        if tag == "npscalar":
            need(shape == [], "npscalar shape")
            return {"npscalar": {"dtype": dtype, "shape": shape, "hex": data.hex()}}
        if node.get("requires_grad"):
            need(dtype in FLOATS, "requires_grad dtype")
        key = (tag, name, bool(node.get("parameter")), bool(node.get("requires_grad")))
        out = {tag: {"dtype": dtype, "shape": shape, "hex": data.hex()},
               "object": self.objects.setdefault(key, len(self.objects))}
        if node.get("requires_grad"):
            out["requires_grad"] = True
        if node.get("parameter"):
            out["parameter"] = True
        return out


def plain(form: Any) -> Any:
    """A decoded-tree form's plain value (for the VGS state's scalars)."""
    if isinstance(form, dict) and "float" in form:
        value = form["float"]
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(value, value) \
            if type(value) is str else value
    return form


# -- section 8: the VGS state -------------------------------------------------------------

def vgs_problems(state: list[list[Any]]) -> tuple[dict[str, Any], list[str]]:
    """The summary a state makes, and why it is invalid (empty when valid)."""
    values = {k: v for k, v in state}
    problems = []
    summary: dict[str, Any] = {}
    for key in SUMMARY[:-1]:
        form = values.get(key)
        if key in PER_PARAMETER:
            if form is None:
                summary[key] = None
            elif isinstance(form, dict) and "tensor" in form:
                summary[key] = form["tensor"]  # replaced by the name below
            else:
                problems.append(key)
            continue
        value = plain(form)
        if isinstance(form, dict) and ("float" not in form):
            problems.append(key)  # a tensor, an array, a container
            continue
        summary[key] = value
    if summary.get("enabled") is None:
        summary["enabled"] = True
    for key in ("beta", "alpha", "eps", "warmup_steps", "step_count"):
        if summary.get(key) is None:
            problems.append(key)

    def check(key: str, ok: bool) -> None:
        if key in summary and summary[key] is not None and not ok:
            problems.append(key)
    s = summary
    check("enabled", type(s.get("enabled")) is bool)
    for key in ("beta", "alpha", "eps", "min_scaling_factor", "variance_cap", *STATS):
        check(key, type(s.get(key)) in (int, float))
    for key in ("warmup_steps", "step_count"):
        check(key, type(s.get(key)) is int and s[key] >= 0)
    if not problems:
        finite = all(math.isfinite(s[k]) for k in ("beta", "alpha", "eps"))
        check("beta", finite and 0 < s["beta"] < 1)
        check("alpha", finite and s["alpha"] >= 0)
        check("eps", finite and s["eps"] > 0)
        m, v = s.get("min_scaling_factor"), s.get("variance_cap")
        check("min_scaling_factor", m is None or (math.isfinite(m) and 0 < m <= 1))
        check("variance_cap", v is None or (math.isfinite(v) and v > 0))
    for key in ("beta", "alpha", "eps", "min_scaling_factor", "variance_cap", *STATS):
        if type(s.get(key)) is int:
            s[key] = float(s[key])
    return summary, problems


def summary_matches(stored: Any, found: dict[str, Any]) -> bool:
    if type(stored) is not dict:
        return False
    for key in SUMMARY:
        want = found.get(key)
        got = stored.get(key, True if key == "enabled" else None)
        if key in STATS and type(got) is str:
            if got not in ("NaN", "Infinity", "-Infinity"):
                return False
            got = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[got]
        if key in ("warmup_steps", "step_count", "enabled", "vgs_version", *PER_PARAMETER):
            if type(got) is not type(want) or got != want:
                return False
            continue
        if want is None or got is None:
            if want is not got:
                return False
            continue
        if type(got) not in (int, float):
            return False
        if not (got == want or (math.isnan(got) and math.isnan(want))):
            return False
    return True


def stored_summary_json(stored: Any) -> dict[str, Any]:
    kept = stored if type(stored) is dict else {}
    return {k: kept.get(k) for k in SUMMARY}


def summary_json(found: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in SUMMARY:
        value = found.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        out[key] = value
    return out


# -- the whole file -----------------------------------------------------------------------

def read(data: bytes) -> dict[str, Any]:
    """The manifest's ``stored`` record for a safetensors vector."""
    try:
        return _read(data)
    except Refused as exc:
        return {"result": exc.kind}


def _read(data: bytes) -> dict[str, Any]:
    need(len(data) >= 9, "short")
    (n,) = struct.unpack_from("<Q", data)
    need(2 <= n <= 104_857_600 and data[8:9] == b"{", "not a checkpoint")
    need(8 + n <= len(data), "truncated header")
    need((8 + n) % 8 == 0, "unaligned")
    try:
        header_text = data[8:8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise bad("utf-8") from None
    stripped = header_text.rstrip(" ")
    need(stripped.endswith("}"), "padding")
    container = parse(stripped)
    need(type(container) is dict, "container")
    meta = container.pop("__metadata__", None)
    need(type(meta) is dict and all(type(v) is str for v in meta.values()), "metadata")
    entries: dict[str, tuple[str, list[int], bytes]] = {}
    spans = []
    for name, entry in container.items():
        need(type(entry) is dict and set(entry) == {"dtype", "shape", "data_offsets"},
             "entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        need(type(dtype) is str and dtype in SIZES, "dtype")
        need(type(shape) is list and len(shape) <= 64
             and all(is_int(d) and 0 <= d < 2**63 for d in shape), "shape")
        need(type(offsets) is list and len(offsets) == 2
             and all(is_int(o) and o >= 0 for o in offsets) and offsets[0] <= offsets[1],
             "offsets")
        need(math.prod(shape) * SIZES[dtype] == offsets[1] - offsets[0], "size")
        need(offsets[0] % SIZES[dtype] == 0, "misaligned")
        spans.append((offsets[0], offsets[1]))
        entries[name] = (dtype, shape, data[8 + n + offsets[0]:8 + n + offsets[1]])
    end = 0
    for begin, stop in sorted(spans):
        need(begin == end, "tiling")
        end = stop
    need(8 + n + end == len(data), "tiling at the end")
    need("vgs_ckpt.format_version" in meta, "not vgs_ckpt")
    fmt = meta["vgs_ckpt.format_version"]
    if fmt not in KNOWN:
        match = re.fullmatch(r"v([0-9]+)_[a-z0-9_]+", fmt)
        raise bad("format", "UnsupportedVersionError" if match and int(match[1]) > 2
                  else "FormatError")
    need(meta.get("format") == "pt", "format pt")
    need("vgs_ckpt.header" in meta, "no header")
    h = parse(meta["vgs_ckpt.header"])
    need(type(h) is dict and h.get("format_version") == fmt, "header format")
    members = read_header_members(h, fmt)
    index = h.get("tensors")
    need(type(index) is dict and set(index) == set(entries), "index")
    for name, info in index.items():
        need(type(info) is dict and info.get("dtype") == entries[name][0]
             and info.get("shape") == entries[name][1], "index entry")
        need(type(info.get("digest")) is str
             and re.fullmatch(r"xxh3-128:[0-9a-f]{32}", info["digest"]) is not None,
             "digest form")
    need(type(h.get("tree")) is dict and "dict" in h["tree"], "root")
    tree = Tree(entries)
    form = tree.form(h["tree"], ())
    for name, path in tree.first.items():
        need(name == path, "name is not the path")
    need(set(tree.first) == set(entries), "unreferenced tensor")
    warnings: list[str] = []
    if fmt == "v1_policy_only":
        holds = any(k == "optimizer_state" for k, _ in form["dict"])
        need(members["has_optimizer_state"] == holds, "has_optimizer_state")
    else:
        state = next((v for k, v in form["dict"] if k == "vgs_state"), None)
        stored = h.get("vgs")
        if state is None:
            need(stored is None, "summary without state")
            members["vgs"] = None
        else:
            need(isinstance(state, dict) and "dict" in state, "vgs_state kind")
            values = dict((k, v) for k, v in state["dict"])
            version = values.get("vgs_version", "1.0")
            if version not in VGS_VERSIONS:
                raise bad("vgs_version", "UnsupportedVersionError")
            found, problems = vgs_problems(state["dict"])
            found["vgs_version"] = version
            raw = dict(next(v for k, v in h["tree"]["dict"] if k == "vgs_state")["dict"])
            for key in PER_PARAMETER:  # the name the state's tensor node references
                if found.get(key) is not None:
                    found[key] = raw[key]["tensor"]
            if problems:
                warnings.append("InvalidVGSStateWarning")
                members["vgs"] = stored_summary_json(stored)
            else:
                need(summary_matches(stored, found), "summary")
                members["vgs"] = summary_json(found)
    for name, info in index.items():
        if info["digest"] != "xxh3-128:" + xxhash.xxh3_128_hexdigest(entries[name][2]):
            raise bad("digest", "IntegrityError")
    for dtype, _, raw in entries.values():
        need(dtype != "BOOL" or all(b in (0, 1) for b in raw), "bool bytes")
    record: dict[str, Any] = {"result": "ok"}
    if warnings:
        record["warnings"] = warnings
    record["header"] = members
    record["tree"] = form
    return record
