"""Hypothesis strategies for parameter trees, and an exact tree comparison.

Integrators can reuse them to property-test their own save/restore paths::

    from hypothesis import given
    from vgs_ckpt.testing import parameter_trees, assert_trees_equal

    @given(parameter_trees())
    def test_round_trip(tree):
        assert_trees_equal(vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0)).parameters, tree)

Requires the ``test`` extra (hypothesis).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vgs_ckpt.errors import MissingDependencyError

try:
    from hypothesis import strategies as st
except ImportError:  # the strategies are hypothesis's: say how to get it
    raise MissingDependencyError("vgs_ckpt.testing (hypothesis strategies) needs hypothesis, "
                                 "which is not installed: pip install 'vgs-ckpt[test]'"
                                 ) from None

from vgs_ckpt._dtypes import BY_CODE
from vgs_ckpt.vgs_state import ADDED_IN_3_2, DEFAULTS

__all__ = ["assert_trees_equal", "numpy_arrays", "parameter_trees", "scalars", "tensors",
           "vgs_states"]

_KEY_TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
_TORCH_DTYPES = [d.torch for d in BY_CODE.values()]
_NUMPY_DTYPES = [d.numpy for d in BY_CODE.values() if d.numpy is not None]


def scalars() -> st.SearchStrategy[Any]:
    """Python scalar leaves: None, bool, int, float (NaN, ±inf, -0.0 included), str."""
    return st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.sampled_from([-0.0, math.inf, -math.inf, math.nan]),
                     st.text(st.characters(codec="utf-8"), max_size=12))


@st.composite
def tensors(draw: st.DrawFn, max_dims: int = 3, max_side: int = 4,
            dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """Torch tensors of every supported dtype (or of ``dtypes``) with random bytes;
    0-d, empty and non-contiguous ones included."""
    dtype = draw(st.sampled_from(list(dtypes) if dtypes is not None else _TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_dims)))
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(
        0, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    if dtype is torch.bool:
        tensor = tensor.view(torch.uint8).clamp(0, 1).view(torch.bool)
    if len(shape) >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)  # non-contiguous
    if dtype.is_floating_point and draw(st.booleans()):
        tensor = tensor.clone().requires_grad_(draw(st.booleans()))
        if draw(st.booleans()):
            return torch.nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
    return tensor


@st.composite
def numpy_arrays(draw: st.DrawFn) -> Any:
    """Numpy arrays and numpy scalars of every dtype the format holds."""
    dtype = draw(st.sampled_from(_NUMPY_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    numel = math.prod(shape)
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    array = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape).copy()
    if dtype.kind == "b":
        array = array.view(np.uint8).clip(0, 1).view(dtype)
    if draw(st.booleans()):
        return array.reshape(-1)[0] if numel else array
    return array


def _keys() -> st.SearchStrategy[str | int]:
    return st.one_of(_KEY_TEXT, st.integers(-3, 20))


def parameter_trees(max_leaves: int = 12) -> st.SearchStrategy[dict[Any, Any]]:
    """Parameter trees: nested dicts (str or int keys), lists and tuples of all leaf types.

    Int and str keys in one dict never read the same (``0`` and ``"0"``), since
    their tensor names would collide and such trees are refused by design.
    """
    leaves = st.one_of(scalars(), tensors(), numpy_arrays())

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(st.lists(children, max_size=4),
                         st.lists(children, max_size=4).map(tuple),
                         _dicts(children))

    tree = st.recursive(leaves, containers, max_leaves=max_leaves)
    return _dicts(tree).map(_maybe_tie)


def _dicts(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def build(pairs: list[tuple[str | int, Any]], ordered: bool) -> dict[Any, Any]:
        out: dict[Any, Any] = OrderedDict() if ordered else {}
        seen: set[str] = set()
        for key, value in pairs:
            if str(key) not in seen:
                seen.add(str(key))
                out[key] = value
        return out

    return st.builds(build, st.lists(st.tuples(_keys(), children), max_size=4), st.booleans())


def _maybe_tie(tree: dict[Any, Any]) -> dict[Any, Any]:
    """Add a tied (shared-storage) tensor next to the first tensor found, if any."""
    for key, value in list(tree.items()):
        if type(value) is torch.Tensor and value.numel():
            tree[f"{key}~tied"] = value
            break
    return tree


def vgs_states(version: str = "3.2", num_params: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Valid VGS ``state_dict()`` values of a given version."""
    finite = st.floats(allow_nan=False, allow_infinity=False, width=32)

    def build(beta: float, alpha: float, step: int, warmup: int, stats: list[float]
              ) -> dict[str, Any]:
        state: dict[str, Any] = {"enabled": True, "beta": beta, "alpha": alpha,
                                 "eps": DEFAULTS["eps"], "warmup_steps": warmup,
                                 "step_count": step,
                                 "grad_mean_ema": None, "grad_var_ema": None,
                                 "grad_norm_ema": None, "grad_max_ema": None}
        if version != "1.0":
            state["vgs_version"] = version
            state["param_grad_mean_ema"] = torch.tensor(stats, dtype=torch.float32)
            state["param_grad_sq_ema"] = torch.tensor(stats, dtype=torch.float32).square()
            state["param_numel"] = torch.arange(1, num_params + 1, dtype=torch.float32)
        if version == "3.2":
            state.update({key: DEFAULTS[key] for key in ADDED_IN_3_2})
        return state

    return st.builds(build, st.floats(0.5, 0.999), st.floats(0, 1), st.integers(0, 10**6),
                     st.integers(0, 1000), st.lists(finite, min_size=num_params,
                                                    max_size=num_params))


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes in C order, whatever its strides (a size-1 view with stride 17
    counts as contiguous, yet cannot be viewed as bytes)."""
    flat = tensor.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


def _expect(condition: bool, message: str) -> None:
    # An explicit raise, not `assert`: it must hold under `python -O` too.
    if not condition:
        raise AssertionError(message)


def assert_trees_equal(actual: Any, expected: Any, path: str = "$") -> None:
    """Assert exact equality: same container and leaf types, same keys in the same order,
    bit-identical tensor and array bytes, floats equal bit for bit (NaN equals NaN, -0.0 is
    not 0.0), same ``requires_grad`` and ``nn.Parameter``-ness.

    Raises:
        AssertionError: at the first difference, naming its path (also under
            ``python -O``).
    """
    _expect(type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}")
    if isinstance(expected, torch.Tensor):
        _expect(actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}")
        _expect(actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}")
        _expect(actual.requires_grad == expected.requires_grad, f"{path}: requires_grad differs")
        a, e = (_bytes_of(t) for t in (actual, expected))
        _expect(torch.equal(a, e), f"{path}: tensor bytes differ")
    elif isinstance(expected, np.ndarray | np.generic):
        _expect(actual.dtype == expected.dtype and actual.shape == expected.shape,
                f"{path}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}")
        _expect(np.asarray(actual).tobytes() == np.asarray(expected).tobytes(),
                f"{path}: array bytes differ")
    elif isinstance(expected, dict):
        _expect(list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}")
        for key in expected:
            assert_trees_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        _expect(len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_trees_equal(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        same = (math.isnan(actual) and math.isnan(expected)) or (
            actual == expected and math.copysign(1, actual) == math.copysign(1, expected))
        _expect(same, f"{path}: {actual!r} != {expected!r}")
    else:
        _expect(actual == expected, f"{path}: {actual!r} != {expected!r}")
