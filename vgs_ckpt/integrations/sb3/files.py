"""Pickle-free SB3 model files: :func:`save` and :func:`load`.

SB3's own ``model.save()`` writes a zip of cloudpickled attributes (schedules and
classes that break across Python versions) and drops the VGS state. :func:`save`
writes one ordinary vgs_ckpt v2 file: the :func:`~.state.get_state` tree plus an
``"sb3_model"`` part describing how to rebuild the model: the algorithm and policy
class by import path (from an allowlist), every constructor setting as JSON
(schedules by their parameters, classes by import path), and the spaces as JSON.
:func:`load` rebuilds the model the way ``BaseAlgorithm.load`` does (a model built
without setup, the settings applied, ``_setup_model()``), re-attaches the VGS and
restores the whole state, counters and generators included. Nothing is unpickled.

The layout of ``"sb3_model"`` is normative: docs/spec.md section 14.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

import vgs_ckpt
from vgs_ckpt.errors import UsageError
from vgs_ckpt.integrations.sb3._base import (
    COUNTERS_KEY,
    MODEL_KEY,
    VEC_NORMALIZE_KEY,
    BaseAlgorithm,
    check_model,
    logger,
    require,
)
from vgs_ckpt.integrations.sb3.hooks import attach_vgs
from vgs_ckpt.integrations.sb3.state import COUNTERS, get_state, set_state
from vgs_ckpt.models import CheckpointHeader
from vgs_ckpt.vgs_state import KEY as VGS_KEY
from vgs_ckpt.vgs_state import KNOBS as VGS_KNOBS

__all__ = ["ALGORITHMS", "MODEL_FORMAT", "describe", "load", "save"]

MODEL_FORMAT = 1
# The algorithms a file may name, by their public import path.
ALGORITHMS = tuple(f"stable_baselines3.{name}" for name in
                   ("A2C", "DDPG", "DQN", "PPO", "SAC", "TD3")) + tuple(
    f"sb3_contrib.{name}" for name in
    ("ARS", "CrossQ", "MaskablePPO", "QRDQN", "RecurrentPPO", "TQC", "TRPO"))
# Classes (policies, buffers, activations, optimizers, feature extractors) a file may
# name: only from these packages, and only classes.
CLASS_PACKAGES = ("stable_baselines3.", "sb3_contrib.", "torch.nn.", "torch.optim.")

# Attributes that are not settings: restored from the state tree, or rebuilt by
# _setup_model(), or transient (the next learn() resets the envs).
_NOT_SETTINGS = frozenset({
    *COUNTERS, "ep_info_buffer", "ep_success_buffer", "_last_obs", "_last_episode_starts",
    "_last_original_obs", "start_time", "observation_space", "action_space",
    "policy_class", "batch_norm_stats", "batch_norm_stats_target", "actor_batch_norm_stats",
    "critic_batch_norm_stats", "actor_batch_norm_stats_target",
    "critic_batch_norm_stats_target", "_last_lstm_states"})
_TAGS = ("$class", "$schedule", "$train_freq", "$action_noise", "$custom")


# --- describing a model ---------------------------------------------------------------

def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _algorithm_path(algo: BaseAlgorithm) -> str:
    cls = type(algo)
    for path in ALGORITHMS:
        package, name = path.split(".")
        if cls.__name__ == name and cls.__module__.split(".")[0] == package:
            return path
    raise UsageError(f"{cls.__qualname__} ({cls.__module__}) is not an algorithm sb3.save "
                     f"can rebuild (it can: {', '.join(p.split('.')[1] for p in ALGORITHMS)}); "
                     "save its state with vgs_ckpt.save(path, sb3.get_state(model)) and "
                     "restore it into a model you build with sb3.set_state")


class _Unstorable(Exception):
    def __init__(self, where: str, value: Any, why: str) -> None:
        super().__init__(where)
        self.where, self.value, self.why = where, value, why


def _encode(value: Any, where: str) -> Any:
    """A setting as a tree value: plain values as they are, the rest tagged."""
    from stable_baselines3.common.noise import (
        NormalActionNoise,
        OrnsteinUhlenbeckActionNoise,
        VectorizedActionNoise,
    )
    from stable_baselines3.common.type_aliases import TrainFreq
    from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule
    if value is None or isinstance(value, bool | int | float | str | np.generic):
        return value
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.detach().clone() if isinstance(value, torch.Tensor) else value.copy()
    if isinstance(value, TrainFreq):
        return {"$train_freq": {"frequency": int(value.frequency), "unit": value.unit.value}}
    if isinstance(value, FloatSchedule):
        return {"$schedule": {"type": "float",
                              "of": _encode(value.value_schedule, where)["$schedule"]}}
    if isinstance(value, ConstantSchedule):
        return {"$schedule": {"type": "constant", "value": float(value.val)}}
    if isinstance(value, LinearSchedule):
        return {"$schedule": {"type": "linear", "start": float(value.start),
                              "end": float(value.end),
                              "end_fraction": float(value.end_fraction)}}
    if isinstance(value, VectorizedActionNoise):
        return {"$action_noise": {"type": "vectorized", "n_envs": len(value.noises),
                                  "base": _encode(value.base_noise, where)["$action_noise"],
                                  "noises": [_encode(n, where)["$action_noise"]
                                             for n in value.noises]}}
    if isinstance(value, OrnsteinUhlenbeckActionNoise):
        return {"$action_noise": {
            "type": "ornstein_uhlenbeck", "mean": np.array(value._mu),
            "sigma": np.array(value._sigma), "theta": float(value._theta),
            "dt": float(value._dt), "dtype": np.dtype(value._dtype).name,
            "initial_noise": None if value.initial_noise is None
            else np.array(value.initial_noise), "noise_prev": np.array(value.noise_prev)}}
    if isinstance(value, NormalActionNoise):
        return {"$action_noise": {"type": "normal", "mean": np.array(value._mu),
                                  "sigma": np.array(value._sigma),
                                  "dtype": np.dtype(value._dtype).name}}
    if isinstance(value, type):
        if not value.__module__.startswith(CLASS_PACKAGES):
            raise _Unstorable(where, value, f"a class from outside "
                              f"{', '.join(p.rstrip('.') for p in CLASS_PACKAGES)}")
        return {"$class": _class_path(value)}
    if isinstance(value, Mapping):
        if len(value) == 1 and next(iter(value)) in _TAGS:
            raise _Unstorable(where, value, f"a dict whose only key is the reserved "
                              f"{next(iter(value))!r}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise _Unstorable(f"{where}.{key!r}", key, "a key that is not a str or int")
            out[key] = _encode(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        encoded = [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(encoded) if isinstance(value, tuple) else encoded
    why = "a callable" if callable(value) else f"a {type(value).__qualname__}"
    raise _Unstorable(where, value, why)


def _box_bound(array: np.ndarray) -> Any:
    flat = np.asarray(array)
    if flat.size and np.all(flat == flat.flat[0]):
        return flat.flat[0].item()
    return flat.tolist()


def space_to_json(space: Any, where: str = "space") -> dict[str, Any]:
    """A gymnasium space as JSON (Box, Discrete, MultiDiscrete, MultiBinary, Dict)."""
    from gymnasium import spaces
    if isinstance(space, spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": np.dtype(space.dtype).name,
                "low": _box_bound(space.low), "high": _box_bound(space.high)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": np.asarray(space.nvec).tolist(),
                "start": np.asarray(space.start).tolist(),
                "dtype": np.dtype(space.dtype).name}
    if isinstance(space, spaces.MultiBinary):
        n = space.n
        return {"type": "MultiBinary", "n": int(n) if isinstance(n, int | np.integer)
                else [int(x) for x in n]}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {str(key): space_to_json(sub, f"{where}.{key}")
                                           for key, sub in space.spaces.items()}}
    raise UsageError(f"{where}: a {type(space).__name__} space cannot be stored (sb3.save "
                     "stores Box, Discrete, MultiDiscrete, MultiBinary and Dict)")


def space_from_json(data: Any, where: str = "space") -> Any:
    """The gymnasium space :func:`space_to_json` described."""
    from gymnasium import spaces
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        raise UsageError(f"{where}: expected a space description with a 'type', got {data!r}")
    kind = data["type"]
    try:
        if kind == "Box":
            dtype = np.dtype(data["dtype"])
            shape = tuple(int(n) for n in data["shape"])
            low = np.broadcast_to(np.asarray(data["low"], dtype=dtype), shape)
            high = np.broadcast_to(np.asarray(data["high"], dtype=dtype), shape)
            return spaces.Box(low=low.copy(), high=high.copy(), shape=shape, dtype=dtype)
        if kind == "Discrete":
            return spaces.Discrete(int(data["n"]), start=int(data.get("start", 0)))
        if kind == "MultiDiscrete":
            return spaces.MultiDiscrete(np.asarray(data["nvec"]), dtype=data["dtype"],
                                        start=np.asarray(data["start"]))
        if kind == "MultiBinary":
            n = data["n"]
            return spaces.MultiBinary(n if isinstance(n, int) else list(n))
        if kind == "Dict":
            return spaces.Dict({key: space_from_json(sub, f"{where}.{key}")
                                for key, sub in data["spaces"].items()})
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"{where}: not a valid {kind} space description ({exc})") from exc
    raise UsageError(f"{where}: unknown space type {kind!r} (known: Box, Discrete, "
                     "MultiDiscrete, MultiBinary, Dict)")


def describe(model: Any, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The ``"sb3_model"`` part: what :func:`load` needs to rebuild ``model``.

    Raises:
        UsageError: an algorithm not in :data:`ALGORITHMS`, a setting that cannot be
            stored without pickle (named, with how to fix it), or a space of another
            kind.
    """
    algo = check_model(model)
    excluded = set(exclude)
    skip = set(algo._excluded_save_params()) | _NOT_SETTINGS
    names, variables = algo._get_torch_save_params()
    for name in [*names, *variables]:
        skip.add(name.split(".")[0])
    settings: dict[str, Any] = {}
    for name, value in algo.__dict__.items():
        if name in skip:
            continue
        if name in excluded:
            settings[name] = {"$custom": type(value).__qualname__}
            continue
        if name == "policy_kwargs" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k != "device"}  # noqa: PLW2901
        try:
            settings[name] = _encode(value, name)
        except _Unstorable as exc:
            top = exc.where.split(".")[0].split("[")[0]
            raise UsageError(
                f"sb3.save: setting {exc.where!r} of this {type(algo).__name__} is {exc.why} "
                f"({exc.value!r}), which vgs_ckpt does not store (no pickle); use a constant "
                "or one of SB3's ConstantSchedule/LinearSchedule/FloatSchedule, or save with "
                f"exclude=[{top!r}] and give it back at load with "
                f"custom_objects={{{top!r}: ...}}") from None
    policy_class = algo.policy_class
    if "policy_class" in excluded:
        policy = {"$custom": policy_class.__qualname__}
    elif policy_class.__module__.startswith(("stable_baselines3.", "sb3_contrib.")):
        policy = {"$class": _class_path(policy_class)}
    else:
        raise UsageError(f"sb3.save: the policy class {_class_path(policy_class)} is not "
                         "part of stable_baselines3 or sb3_contrib; save with "
                         "exclude=['policy_class'] and give it back at load with "
                         "custom_objects={'policy_class': YourPolicy}")
    versions = {}
    for package in ("stable_baselines3", "sb3_contrib", "gymnasium", "torch", "numpy"):
        try:
            versions[package] = str(importlib.import_module(package).__version__)
        except ImportError:
            continue
    return {"format": MODEL_FORMAT, "algorithm": _algorithm_path(algo),
            "policy_class": policy,
            "observation_space": space_to_json(algo.observation_space, "observation_space"),
            "action_space": space_to_json(algo.action_space, "action_space"),
            "settings": settings, "versions": versions}


# --- save and load --------------------------------------------------------------------

def save(model: Any, path: str | os.PathLike[str], *, replay_buffer: bool = False,
         env: Any = None, exclude: Iterable[str] = (), **save_kwargs: Any
         ) -> CheckpointHeader:
    """Write ``model`` to one ordinary vgs_ckpt v2 file that :func:`load` rebuilds.

    Holds the :func:`~.state.get_state` tree (networks, optimizers, VGS,
    ``VecNormalize`` statistics, counters, generators, exploration state) and the
    ``"sb3_model"`` description; ``replay_buffer=True`` adds the replay buffer.

    Args:
        env: the env whose ``VecNormalize`` statistics and generators to record
            (default: ``model.get_env()``).
        exclude: settings to leave out (callables and classes vgs_ckpt cannot store
            without pickle); :func:`load` then needs them in ``custom_objects``.
        save_kwargs: passed to :func:`vgs_ckpt.save` (``performance``, ``member_id``,
            ``hyperparams``, ``lineage``, ``durable``); ``step`` defaults to
            ``model.num_timesteps``.

    Raises:
        UsageError: see :func:`describe` and :func:`~.state.get_state`.
    """
    algo = check_model(model)
    description = describe(algo, exclude=exclude)
    tree = get_state(algo, env=env, replay_buffer=replay_buffer)
    tree[MODEL_KEY] = description
    save_kwargs.setdefault("step", int(algo.num_timesteps))
    return vgs_ckpt.save(path, tree, **save_kwargs)


def _resolve_class(path: Any, where: str, prefixes: tuple[str, ...] = CLASS_PACKAGES) -> type:
    if not isinstance(path, str) or ":" not in path:
        raise UsageError(f"{where}: expected 'module:QualName', got {path!r}")
    module_name, qualname = path.split(":", 1)
    if not (module_name + ".").startswith(prefixes):
        raise UsageError(f"{where}: {path} is outside the packages a file may name "
                         f"({', '.join(p.rstrip('.') for p in prefixes)}); give the class "
                         "through custom_objects instead")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"{where}: cannot find {path} ({exc}); was the file written with "
                         "another version of stable-baselines3 or sb3-contrib?") from exc
    if not isinstance(obj, type):
        raise UsageError(f"{where}: {path} is not a class")
    return obj


def _decode(value: Any, where: str) -> Any:
    from stable_baselines3.common.noise import (
        NormalActionNoise,
        OrnsteinUhlenbeckActionNoise,
        VectorizedActionNoise,
    )
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
    from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule
    if isinstance(value, Mapping):
        if len(value) == 1 and next(iter(value)) in _TAGS:
            tag, body = next(iter(value.items()))
            try:
                if tag == "$class":
                    return _resolve_class(body, where)
                if tag == "$custom":
                    raise UsageError(f"setting {where!r} was excluded when the file was saved "
                                     f"(a {body}); give it back with "
                                     f"custom_objects={{{where.split('.', 1)[0]!r}: ...}}")
                if tag == "$train_freq":
                    return TrainFreq(int(body["frequency"]), TrainFrequencyUnit(body["unit"]))
                if tag == "$schedule":
                    kind = body["type"]
                    if kind == "float":
                        return FloatSchedule(_decode({"$schedule": body["of"]}, where))
                    if kind == "constant":
                        return ConstantSchedule(float(body["value"]))
                    if kind == "linear":
                        return LinearSchedule(float(body["start"]), float(body["end"]),
                                              float(body["end_fraction"]))
                    raise UsageError(f"setting {where!r}: unknown schedule type {kind!r}")
                if tag == "$action_noise":
                    return _decode_noise(body, NormalActionNoise, OrnsteinUhlenbeckActionNoise,
                                         VectorizedActionNoise)
            except (KeyError, TypeError, ValueError) as exc:
                raise UsageError(f"setting {where!r}: not a valid {tag} value ({exc})") from exc
        return {key: _decode(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_decode(item, f"{where}[{i}]") for i, item in enumerate(value))
    return value


def _decode_noise(body: Mapping[str, Any], normal: Any, ou: Any, vectorized: Any) -> Any:
    kind = body["type"]
    if kind == "vectorized":
        noise = vectorized(_decode_noise(body["base"], normal, ou, vectorized),
                           int(body["n_envs"]))
        noise.noises = [_decode_noise(n, normal, ou, vectorized) for n in body["noises"]]
        return noise
    dtype = np.dtype(body["dtype"])
    if kind == "normal":
        return normal(np.asarray(body["mean"]), np.asarray(body["sigma"]), dtype=dtype)
    if kind == "ornstein_uhlenbeck":
        initial = body["initial_noise"]
        noise = ou(np.asarray(body["mean"]), np.asarray(body["sigma"]),
                   theta=float(body["theta"]), dt=float(body["dt"]),
                   initial_noise=None if initial is None else np.asarray(initial), dtype=dtype)
        noise.noise_prev = np.asarray(body["noise_prev"]).copy()
        return noise
    raise ValueError(f"unknown action noise type {kind!r}")


def load(path: str | os.PathLike[str], env: Any = None, *, device: str | torch.device = "auto",
         custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Rebuild the model that :func:`save` wrote, VGS re-attached and state restored.

    Args:
        env: the env to train on (wrap it in ``VecNormalize`` as the saved member's
            was: its statistics are restored into it); its spaces must equal the
            saved ones. Without an env the model can ``predict`` (on observations
            you normalise yourself: a warning says so when the file has
            ``VecNormalize`` statistics).
        device: where the networks live (``"auto"``: CUDA when available).
        custom_objects: settings (and ``"policy_class"``) to use instead of the
            stored ones, as in SB3's ``load``; required for those saved with
            ``exclude=``.

    Raises:
        UsageError: not an :func:`save` file, an algorithm or class outside the
            allowlist, an excluded setting missing from ``custom_objects``, or an
            env whose spaces differ from the saved ones.
        FormatError, IntegrityError: the file itself is damaged (see
            :func:`vgs_ckpt.load`).
    """
    require()
    checkpoint = vgs_ckpt.load(path, map_location="cpu")
    tree = dict(checkpoint.parameters)
    where = os.fspath(path)
    description = tree.pop(MODEL_KEY, None)
    if not isinstance(description, Mapping):
        raise UsageError(f"{where}: not a file written by sb3.save (it has no {MODEL_KEY!r} "
                         "part); build the model yourself and restore this tree with "
                         "sb3.set_state(model, vgs_ckpt.load(path).parameters)")
    if description.get("format") != MODEL_FORMAT:
        raise UsageError(f"{where}: {MODEL_KEY}.format {description.get('format')!r} is not "
                         f"one this vgs_ckpt reads ({MODEL_FORMAT}); upgrade vgs_ckpt")
    custom = dict(custom_objects or {})
    algorithm = description.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"{where}: {MODEL_KEY}.algorithm {algorithm!r} is not one sb3.load "
                         f"rebuilds ({', '.join(ALGORITHMS)})")
    package, name = str(algorithm).split(".")
    try:
        cls = getattr(importlib.import_module(package), name)
    except ImportError as exc:
        raise UsageError(f"{where}: the file holds a {algorithm} model; install "
                         f"{package.replace('_', '-')} ({exc})") from exc
    if "policy_class" in custom:
        policy_class = custom.pop("policy_class")
    else:
        stored = description.get("policy_class")
        if isinstance(stored, Mapping) and "$custom" in stored:
            raise UsageError(f"{where}: the policy class was excluded when the file was "
                             "saved; give it back with custom_objects={'policy_class': ...}")
        policy_class = _resolve_class(stored.get("$class") if isinstance(stored, Mapping)
                                      else stored, f"{MODEL_KEY}.policy_class",
                                      ("stable_baselines3.", "sb3_contrib."))
    observation_space = space_from_json(description.get("observation_space"),
                                        "observation_space")
    action_space = space_from_json(description.get("action_space"), "action_space")
    raw = description.get("settings")
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where}: {MODEL_KEY}.settings must be a mapping")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        settings[key] = custom.pop(key) if key in custom else _decode(value, key)
    settings.update(custom)  # custom objects for settings the file does not have
    if env is not None:
        from stable_baselines3.common.utils import check_for_correct_spaces
        env = cls._wrap_env(env, settings.get("verbose", 0))
        try:
            check_for_correct_spaces(env, observation_space, action_space)
        except ValueError as exc:
            raise UsageError(f"{where}: the env's spaces differ from the saved model's "
                             f"({exc})") from exc
        observation_space, action_space = env.observation_space, env.action_space
        settings["n_envs"] = env.num_envs
    elif tree.get(VEC_NORMALIZE_KEY) is not None:
        logger.warning("%s: the file holds VecNormalize statistics but no env was given; "
                       "they are not applied (pass env= wrapped in VecNormalize to train, or "
                       "normalise observations yourself to predict)", where)
        tree.pop(VEC_NORMALIZE_KEY)
    model = cls(policy=policy_class, env=env, device=device,
                _init_setup_model=False)
    model.__dict__.update(settings)
    model.observation_space, model.action_space = observation_space, action_space
    seed = model.seed
    model.seed = None  # _setup_model would reseed the globals and the env
    try:
        model._setup_model()
    finally:
        model.seed = seed
    vgs = tree.get(VGS_KEY)
    if isinstance(vgs, Mapping):
        attach_vgs(model, **{k: vgs[k] for k in VGS_KNOBS if k in vgs})
    set_state(model, tree, env=env, restore_counters=True, restore_rng=True)
    if COUNTERS_KEY not in tree:
        model.num_timesteps = checkpoint.header.step
    model._last_obs = None  # the next learn() resets the envs
    return model
