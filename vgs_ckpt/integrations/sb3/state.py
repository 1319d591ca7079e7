"""A member's whole learner state as one tree: :func:`get_state` and :func:`set_state`.

What a tree holds (the layout is normative: docs/spec.md section 14):

- every SB3 state-dict name (``"policy"``, ``"policy.optimizer"``, ...), as
  ``model.get_parameters()`` returns them (networks, target networks, batch-norm
  running statistics, optimizers);
- ``"pytorch_variables"``: SB3's torch variables (SAC's and TQC's ``log_ent_coef``);
- ``"vgs_state"`` (None without :func:`~.hooks.attach_vgs`) and ``"vgs_pending"``;
- ``"vec_normalize"``: the ``VecNormalize`` statistics and settings, when the env
  is wrapped in one;
- ``"counters"``: ``num_timesteps``, ``_n_updates``, ``_episode_num``, schedule
  progress, DQN's ``_n_calls`` and ``exploration_rate``, the episode-info buffers;
- ``"rng"``: Python ``random``, NumPy's global generator, torch CPU (and CUDA where
  it is initialised), the model's spaces' generators and each env's ``np_random``;
- ``"exploration"``: the action noise's state (TD3/DDPG) and the gSDE exploration
  matrices, when the algorithm has them;
- ``"replay_buffer"``: only with ``get_state(model, replay_buffer=True)``.

Who owns what after :func:`set_state` (docs/integration.md, "What travels on an
exploit"): by default (an exploit) everything learned travels (weights, optimizers,
VGS, normalizer statistics, the replay buffer when the tree has one) and the
recipient keeps its own counters, randomness and exploration state; a resume
(``restore_counters=True, restore_rng=True``, as :func:`~.population.restore_member`
and :func:`~.files.load` do) restores those too.
"""

from __future__ import annotations

import functools
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vgs_ckpt.errors import PartialStateWarning, UsageError, warn
from vgs_ckpt.integrations.sb3._base import (
    COUNTERS_KEY,
    EXPLORATION_KEY,
    MODEL_KEY,
    REPLAY_BUFFER_KEY,
    RESERVED,
    RNG_KEY,
    VARIABLES_KEY,
    VEC_NORMALIZE_KEY,
    VGS_PENDING_KEY,
    BaseAlgorithm,
    check_model,
    recursive_getattr,
)
from vgs_ckpt.integrations.sb3.hooks import vgs_scaler
from vgs_ckpt.integrations.sb3.hyperparams import plan_hyperparams
from vgs_ckpt.vgs import VarianceGradientScaler
from vgs_ckpt.vgs_state import KEY as VGS_KEY

__all__ = ["COUNTERS", "COUNTERS_KEY", "get_state", "set_state"]

# Integer and float counters, where the algorithm has them (in this order).
COUNTERS = ("num_timesteps", "_total_timesteps", "_num_timesteps_at_start", "_episode_num",
            "_n_updates", "_current_progress_remaining", "_n_calls", "exploration_rate")
_BUFFERS = ("ep_info_buffer", "ep_success_buffer")
_VEC_NORMALIZE_SETTINGS = ("clip_obs", "clip_reward", "gamma", "epsilon")
_VEC_NORMALIZE_STRUCTURE = ("norm_obs", "norm_reward", "norm_obs_keys")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_MISSING = object()
# What the generators' own setters raise for a state of the wrong shape.
_BAD_STATE = (TypeError, ValueError, KeyError, IndexError, OverflowError)


def _vec_normalize(venv: Any) -> Any:
    from stable_baselines3.common.vec_env import unwrap_vec_normalize
    return unwrap_vec_normalize(venv) if venv is not None else None


def _env_of(algo: BaseAlgorithm, env: Any) -> Any:
    return env if env is not None else algo.get_env()


# --- get_state ------------------------------------------------------------------------

def get_state(model: Any, *, env: Any = None, replay_buffer: bool = False) -> dict[str, Any]:
    """The whole learner state of ``model`` as one plain tree (the layout above).

    Args:
        env: the env whose ``VecNormalize`` statistics and generators to record
            (default: ``model.get_env()``).
        replay_buffer: also record the replay buffer (off-policy algorithms) as
            arrays, for a resume. An exploit keeps the recipient's own buffer, so the
            scheduler's checkpoints leave it out by default.

    Like ``state_dict()``, the tensors of the networks share memory with the model:
    save the tree before training on. Everything else is a copy.

    Raises:
        UsageError: ``replay_buffer=True`` for an algorithm without one (or one of a
            type this integration cannot store), or an algorithm that uses a name
            this integration reserves.
    """
    algo = check_model(model)
    tree: dict[str, Any] = algo.get_parameters()
    clash = [key for key in RESERVED if key in tree]
    if clash:
        raise UsageError(f"{type(algo).__name__}.get_parameters() already has {clash}; "
                         "those names are reserved by this integration; rename those "
                         "attributes of your algorithm")
    variables = algo._get_torch_save_params()[1]
    if variables:
        tree[VARIABLES_KEY] = {name: recursive_getattr(algo, name).detach()
                               for name in variables}
    scaler = vgs_scaler(algo)
    tree[VGS_KEY] = scaler.state_dict() if scaler is not None else None
    if scaler is not None:
        tree[VGS_PENDING_KEY] = scaler.pending()
    venv = _env_of(algo, env)
    normalizer = _vec_normalize(venv)
    if normalizer is not None:
        tree[VEC_NORMALIZE_KEY] = vec_normalize_state(normalizer)
    tree[COUNTERS_KEY] = _counters(algo)
    tree[RNG_KEY] = rng_state(algo, venv)
    exploration = _exploration(algo)
    if exploration:
        tree[EXPLORATION_KEY] = exploration
    if replay_buffer:
        tree[REPLAY_BUFFER_KEY] = replay_buffer_state(algo)
    return tree


def _stats(rms: Any) -> dict[str, Any]:
    return {"mean": np.array(rms.mean, dtype=np.float64), "var": np.array(rms.var,
                                                                          dtype=np.float64),
            "count": float(rms.count)}


def vec_normalize_state(normalizer: Any) -> dict[str, Any]:
    """``obs_rms`` (None without ``norm_obs``; a dict per key for Dict observations),
    ``ret_rms`` and the settings of a ``VecNormalize``. Its per-env running
    ``returns`` are accumulators of its own envs' current episodes: they do not
    travel (docs/spec.md section 14)."""
    obs_rms: Any = None
    if normalizer.norm_obs:
        rms = normalizer.obs_rms
        obs_rms = ({key: _stats(value) for key, value in rms.items()}
                   if isinstance(rms, dict) else _stats(rms))
    return {"obs_rms": obs_rms, "ret_rms": _stats(normalizer.ret_rms),
            "settings": _vec_normalize_settings(normalizer)}


def _vec_normalize_settings(normalizer: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {key: float(getattr(normalizer, key))
                                for key in _VEC_NORMALIZE_SETTINGS}
    settings["norm_obs"] = bool(normalizer.norm_obs)
    settings["norm_reward"] = bool(normalizer.norm_reward)
    keys = normalizer.norm_obs_keys
    settings["norm_obs_keys"] = [str(k) for k in keys] if keys is not None else None
    return settings


def _plain(value: Any) -> Any:
    """An episode-info value as a plain tree leaf (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _counters(algo: BaseAlgorithm) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in COUNTERS:
        value = getattr(algo, name, _MISSING)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    for name in _BUFFERS:
        buffer = getattr(algo, name, None)
        if buffer is None:
            out[name] = None
        elif name == "ep_info_buffer":
            out[name] = [{str(k): _plain(v) for k, v in info.items()} for info in buffer]
        else:
            out[name] = [_plain(v) for v in buffer]
    return out


def _generator_state(generator: Any) -> dict[str, Any] | None:
    if generator is None:
        return None
    return dict(generator.bit_generator.state)


def _space_rng(space: Any) -> dict[str, Any]:
    from gymnasium import spaces
    out: dict[str, Any] = {"generator": _generator_state(getattr(space, "_np_random", None))}
    if isinstance(space, spaces.Dict):
        out["spaces"] = {str(key): _space_rng(sub) for key, sub in space.spaces.items()}
    elif isinstance(space, spaces.Tuple):
        out["spaces"] = [_space_rng(sub) for sub in space.spaces]
    return out


def rng_state(algo: BaseAlgorithm, venv: Any) -> dict[str, Any]:
    """Every generator that SB3 seeds and that drives training (see module docs)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
        "cuda": ([t for t in torch.cuda.get_rng_state_all()]
                 if torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
                 else None),
        "action_space": _space_rng(algo.action_space),
        "observation_space": _space_rng(algo.observation_space),
        "envs": None,
    }
    if venv is not None:
        try:
            generators = venv.get_attr("np_random")
        except (AttributeError, NotImplementedError):  # an env without np_random
            generators = None
        if generators is not None:
            state["envs"] = [_generator_state(g) if isinstance(g, np.random.Generator)
                             else None for g in generators]
    return state


def _gsde_holders(algo: BaseAlgorithm) -> list[tuple[str, Any, Any]]:
    """``(name, module, distribution)`` of each gSDE distribution: the policy's (PPO,
    A2C) or its actor's (SAC, TQC, CrossQ)."""
    from stable_baselines3.common.distributions import StateDependentNoiseDistribution
    found = []
    for name in ("policy", "actor"):
        holder = getattr(algo.policy, name, None) if name == "actor" else algo.policy
        dist = getattr(holder, "action_dist", None)
        if isinstance(dist, StateDependentNoiseDistribution):
            found.append((name, holder, dist))
    return found


def _noise_state(noise: Any) -> Any:
    from stable_baselines3.common.noise import (
        OrnsteinUhlenbeckActionNoise,
        VectorizedActionNoise,
    )
    if isinstance(noise, VectorizedActionNoise):
        return [_noise_state(n) for n in noise.noises]
    if isinstance(noise, OrnsteinUhlenbeckActionNoise):
        return {"noise_prev": np.array(noise.noise_prev)}
    return None  # NormalActionNoise and the like hold no state between calls


def _exploration(algo: BaseAlgorithm) -> dict[str, Any]:
    out: dict[str, Any] = {}
    noise = getattr(algo, "action_noise", None)
    if noise is not None:
        out["action_noise"] = _noise_state(noise)
    gsde = {}
    for name, _, dist in _gsde_holders(algo):
        mats = {key: getattr(dist, key).detach().clone() for key in
                ("exploration_mat", "exploration_matrices") if hasattr(dist, key)}
        if mats:
            gsde[name] = mats
    if gsde:
        out["gsde"] = gsde
    return out


def replay_buffer_state(algo: BaseAlgorithm) -> dict[str, Any]:
    """The filled part of a ``ReplayBuffer`` or ``DictReplayBuffer`` as arrays."""
    from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
    buffer = getattr(algo, "replay_buffer", None)
    kind = type(algo).__name__
    if buffer is None:
        raise UsageError(f"replay_buffer=True: this {kind} has no replay buffer (on-policy "
                         "algorithms collect fresh rollouts); leave replay_buffer False")
    if type(buffer) not in (ReplayBuffer, DictReplayBuffer):
        raise UsageError(f"replay_buffer=True: a {type(buffer).__name__} cannot be stored (only "
                         "ReplayBuffer and DictReplayBuffer are); leave replay_buffer False")
    n = buffer.buffer_size if buffer.full else buffer.pos

    def part(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, dict):
            return {str(k): np.ascontiguousarray(v[:n]) for k, v in value.items()}
        return np.ascontiguousarray(value[:n])

    arrays = {name: part(getattr(buffer, name, None)) for name in
              ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")}
    return {"type": type(buffer).__name__, "buffer_size": int(buffer.buffer_size),
            "n_envs": int(buffer.n_envs), "pos": int(buffer.pos), "full": bool(buffer.full),
            "arrays": arrays}


# --- set_state ------------------------------------------------------------------------

def set_state(model: Any, tree: Mapping[str, Any], *,
              hyperparams: Mapping[str, Any] | None = None, env: Any = None,
              restore_counters: bool = False, restore_rng: bool = False) -> None:
    """Restore a :func:`get_state` tree into ``model`` in place, then apply
    ``hyperparams`` (see :func:`~.hyperparams.set_hyperparams`).

    By default (an exploit) the learned state travels: networks, optimizers, torch
    variables, VGS, the ``VecNormalize`` statistics and settings (into ``env`` or
    ``model.get_env()``) and a replay buffer when the tree holds one. The recipient
    keeps its own counters and randomness, and its gSDE exploration matrices are
    resampled from the new policy. ``restore_counters`` and ``restore_rng`` (a
    resume of the member's own checkpoint) restore those too.

    Parts the tree lacks keep their current state, with a warning (a policy-only
    ``{"policy": ...}`` tree from a legacy file loads the weights and nothing else).
    A ``"vgs_state"`` of None resets the attached scaler's statistics. Everything is
    checked before anything changes.

    Raises:
        UsageError: a part, variable or hyperparameter this algorithm does not have,
            VGS state for a model without :func:`~.hooks.attach_vgs`, ``VecNormalize``
            statistics for a model whose env has no ``VecNormalize`` (or of another
            shape or structure), a module state dict whose keys differ from the
            model's, or a replay buffer of another size.
    """
    algo = check_model(model)
    parts = dict(tree)
    vgs = parts.pop(VGS_KEY, _MISSING)
    pending = parts.pop(VGS_PENDING_KEY, None)
    variables = parts.pop(VARIABLES_KEY, None) or {}
    normalizer_state = parts.pop(VEC_NORMALIZE_KEY, None)
    counters = parts.pop(COUNTERS_KEY, None)
    rng = parts.pop(RNG_KEY, None)
    exploration = parts.pop(EXPLORATION_KEY, None)
    buffer_state = parts.pop(REPLAY_BUFFER_KEY, None)
    parts.pop(MODEL_KEY, None)
    names, variable_names = algo._get_torch_save_params()
    kind = type(algo).__name__
    unknown = [str(key) for key in parts if key not in names]
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not part of this {kind} (its parts are "
                         f"{', '.join(names)}); was the checkpoint written by another "
                         "algorithm or policy?")
    unknown = [str(key) for key in variables if key not in variable_names]
    if unknown:
        raise UsageError(f"{VARIABLES_KEY}: {', '.join(unknown)} not in this {kind} (it has "
                         f"{', '.join(variable_names) or 'none'}); e.g. a SAC with a learned "
                         "ent_coef cannot restore into one with a fixed ent_coef")
    for name, value in variables.items():
        target = recursive_getattr(algo, name)
        if not isinstance(value, torch.Tensor) or value.shape != target.shape:
            raise UsageError(f"{VARIABLES_KEY}.{name}: expected a tensor of shape "
                             f"{tuple(target.shape)}, got {getattr(value, 'shape', value)!r}")
    scaler = vgs_scaler(algo)
    if vgs is not _MISSING and vgs is not None:
        if scaler is None:
            raise UsageError(f"the tree carries VGS state but this {kind} has no VGS; call "
                             "attach_vgs(model) before set_state")
        # Load into a scratch scaler first: a bad state raises before anything changes.
        scratch = VarianceGradientScaler(scaler.params, **scaler.config())
        scratch.load_state_dict(vgs)
        scratch.load_pending(pending)
    for name, part in parts.items():
        target = recursive_getattr(algo, name)
        if isinstance(target, torch.nn.Module):
            expected, given = set(target.state_dict()), set(part)
            if expected != given:
                raise UsageError(f"{name}: the state dict does not match this {kind}'s "
                                 f"(missing {sorted(expected - given)[:5]}, unexpected "
                                 f"{sorted(given - expected)[:5]}); the network "
                                 "architectures differ")
    venv = _env_of(algo, env)
    normalizer = _vec_normalize(venv)
    steps: list[Callable[[], None]] = []
    if normalizer_state is not None:
        steps.append(_plan_vec_normalize(normalizer, normalizer_state, kind))
    elif normalizer is not None:
        warn(f"set_state: the tree has no {VEC_NORMALIZE_KEY} statistics; this {kind} keeps "
             "its own (a checkpoint saved without the env, or from a member without "
             "VecNormalize)", PartialStateWarning)
    if buffer_state is not None:
        steps.append(_plan_replay_buffer(algo, buffer_state))
    if restore_counters:
        steps.append(_plan_counters(algo, counters))
    if restore_rng:
        steps.append(_plan_exploration(algo, exploration))
        steps.append(_plan_rng(algo, venv, rng))
    apply = plan_hyperparams(algo, hyperparams or {}, scaler)

    missing = [name for name in names if name not in parts]
    if missing:
        warn(f"set_state: the tree has no {missing}; this {kind} keeps its own",
             PartialStateWarning)
    algo.set_parameters(parts, exact_match=not missing, device=algo.device)
    with torch.no_grad():
        for name, value in variables.items():
            recursive_getattr(algo, name).copy_(value)
    if "policy" in parts and isinstance(getattr(algo, "weights", None), torch.Tensor) \
            and hasattr(algo.policy, "load_from_vector"):
        # ARS steps a flat copy of the policy's weights and writes it back: refresh it,
        # or the next update would overwrite the restored policy with the old weights.
        setattr(algo, "weights",  # noqa: B010
                torch.nn.utils.parameters_to_vector(algo.policy.parameters()).detach())
    if vgs is not _MISSING and scaler is not None:
        scaler.load_state_dict(vgs)
        scaler.load_pending(pending)
    for step in apply:
        step()
    if not restore_rng and getattr(algo, "use_sde", False) and "policy" in parts:
        # The matrices were sampled from the old policy's log_std: resample them from
        # the new one (with the recipient's own generator).
        n_envs = getattr(algo, "n_envs", 1) or 1
        for _, holder, _ in _gsde_holders(algo):
            holder.reset_noise(n_envs)
    for step in steps:  # the generators last: nothing after them draws a number
        step()


def _check_stats(where: str, value: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping) or set(value) != {"mean", "var", "count"}:
        raise UsageError(f"{where}: expected mean, var and count, got {value!r}")
    out: dict[str, Any] = {}
    for key in ("mean", "var"):
        array = np.asarray(value[key], dtype=np.float64)
        if array.shape != shape:
            raise UsageError(f"{where}.{key}: shape {array.shape} does not match the "
                             f"recipient's {shape}; the observation spaces differ")
        out[key] = array.copy()
    count = value["count"]
    if isinstance(count, bool) or not isinstance(count, int | float) or not count > 0:
        raise UsageError(f"{where}.count must be a number > 0, got {count!r}")
    out["count"] = float(count)
    return out


def _plan_vec_normalize(normalizer: Any, state: Any, kind: str) -> Callable[[], None]:
    where = VEC_NORMALIZE_KEY
    if normalizer is None:
        raise UsageError(f"the tree carries {where} statistics but this {kind}'s env is not "
                         "wrapped in VecNormalize; wrap it (VecNormalize(venv)) and pass it "
                         "as env=, or drop the tree's 'vec_normalize' part to train "
                         "without normalisation")
    if not isinstance(state, Mapping) or not {"obs_rms", "ret_rms", "settings"} <= set(state):
        raise UsageError(f"{where}: expected obs_rms, ret_rms and settings, got {state!r}")
    settings = state["settings"]
    if not isinstance(settings, Mapping):
        raise UsageError(f"{where}.settings must be a mapping, got {settings!r}")
    mine = _vec_normalize_settings(normalizer)
    for key in _VEC_NORMALIZE_STRUCTURE:
        theirs = settings.get(key)
        theirs = list(theirs) if isinstance(theirs, list | tuple) else theirs
        if theirs != mine[key]:
            raise UsageError(f"{where}.settings.{key}: the tree has {theirs!r}, this env's "
                             f"VecNormalize has {mine[key]!r}; wrap the env with the same "
                             "VecNormalize settings as the checkpoint's member")
    numbers = {}
    for key in _VEC_NORMALIZE_SETTINGS:
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise UsageError(f"{where}.settings.{key} must be a finite number, got {value!r}")
        numbers[key] = float(value)
    obs: Any = None
    if normalizer.norm_obs:
        rms = normalizer.obs_rms
        given = state["obs_rms"]
        if isinstance(rms, dict):
            if not isinstance(given, Mapping) or set(given) != set(rms):
                raise UsageError(f"{where}.obs_rms: keys {sorted(given or ())} do not match "
                                 f"this env's {sorted(rms)}")
            obs = {key: _check_stats(f"{where}.obs_rms.{key}", given[key], rms[key].mean.shape)
                   for key in rms}
        else:
            obs = _check_stats(f"{where}.obs_rms", given, rms.mean.shape)
    ret = _check_stats(f"{where}.ret_rms", state["ret_rms"], normalizer.ret_rms.mean.shape)

    def put(rms: Any, stats: Mapping[str, Any]) -> None:
        # A 0-d statistic (ret_rms) is a numpy float64 once SB3 has updated it.
        mean, var = (v[()] if v.ndim == 0 else v for v in (stats["mean"], stats["var"]))
        rms.mean, rms.var, rms.count = mean, var, stats["count"]

    def step() -> None:
        if obs is not None:
            if isinstance(normalizer.obs_rms, dict):
                for key, stats in obs.items():
                    put(normalizer.obs_rms[key], stats)
            else:
                put(normalizer.obs_rms, obs)
        put(normalizer.ret_rms, ret)
        for key, value in numbers.items():
            setattr(normalizer, key, value)
    return step


def _plan_replay_buffer(algo: BaseAlgorithm, state: Any) -> Callable[[], None]:
    buffer = getattr(algo, "replay_buffer", None)
    kind = type(algo).__name__
    where = REPLAY_BUFFER_KEY
    if buffer is None:
        raise UsageError(f"the tree carries a replay buffer but this {kind} has none; drop "
                         f"the tree's {where!r} part")
    if not isinstance(state, Mapping) or not isinstance(state.get("arrays"), Mapping):
        raise UsageError(f"{where}: expected type, buffer_size, n_envs, pos, full and arrays")
    for key in ("type", "buffer_size", "n_envs"):
        mine = type(buffer).__name__ if key == "type" else getattr(buffer, key)
        if state.get(key) != mine:
            raise UsageError(f"{where}.{key}: the tree has {state.get(key)!r}, this {kind}'s "
                             f"buffer has {mine!r}; create the model with the same "
                             "buffer_size and number of envs")
    pos, full = state.get("pos"), state.get("full")
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < buffer.buffer_size \
            or not isinstance(full, bool):
        raise UsageError(f"{where}: pos must be an int in [0, buffer_size) and full a bool, "
                         f"got pos={pos!r}, full={full!r}")
    n = buffer.buffer_size if full else pos
    writes: list[tuple[Any, np.ndarray]] = []
    for name, given in state["arrays"].items():
        target = getattr(buffer, name, None)
        targets: Mapping[Any, Any] = target if isinstance(target, dict) else {None: target}
        values: Mapping[Any, Any] = given if isinstance(given, Mapping) else {None: given}
        if given is None and target is None:
            continue
        if set(values) != set(targets):
            raise UsageError(f"{where}.arrays.{name}: keys {sorted(map(str, values))} do not "
                             f"match the buffer's {sorted(map(str, targets))}")
        for key, array in values.items():
            dest = targets[key]
            label = f"{where}.arrays.{name}" + (f".{key}" if key is not None else "")
            if not isinstance(array, np.ndarray) or array.shape != (n, *dest.shape[1:]) \
                    or array.dtype != dest.dtype:
                raise UsageError(f"{label}: expected a {dest.dtype} array of shape "
                                 f"{(n, *dest.shape[1:])}, got "
                                 f"{getattr(array, 'dtype', type(array).__name__)} "
                                 f"{getattr(array, 'shape', '')}")
            writes.append((dest, array))

    def step() -> None:
        for dest, array in writes:
            dest[:n] = array
        buffer.pos, buffer.full = pos, full
    return step


def _plan_counters(algo: BaseAlgorithm, counters: Any) -> Callable[[], None]:
    if counters is None:
        warn(f"set_state: the tree has no {COUNTERS_KEY}; this {type(algo).__name__} keeps "
             "its own (a checkpoint from before vgs_ckpt 0.6)", PartialStateWarning)
        return lambda: None
    if not isinstance(counters, Mapping):
        raise UsageError(f"{COUNTERS_KEY} must be a mapping, got {counters!r}")
    values: dict[str, Any] = {}
    for name in COUNTERS:
        if name not in counters or not hasattr(algo, name):
            continue
        value = counters[name]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise UsageError(f"{COUNTERS_KEY}.{name} must be a finite number, got {value!r}")
        values[name] = value
    buffers: dict[str, Any] = {}
    for name in _BUFFERS:
        value = counters.get(name)
        if value is not None and not isinstance(value, list | tuple):
            raise UsageError(f"{COUNTERS_KEY}.{name} must be a list or None, got {value!r}")
        buffers[name] = value

    def step() -> None:
        for name, value in values.items():
            setattr(algo, name, value)
        window = getattr(algo, "_stats_window_size", 100)
        for name, value in buffers.items():
            setattr(algo, name, deque(value, maxlen=window) if value is not None else None)
    return step


def _generator(where: str, state: Any) -> np.random.Generator:
    if not isinstance(state, Mapping) or state.get("bit_generator") not in _BIT_GENERATORS:
        raise UsageError(f"{where}: expected a numpy bit-generator state (one of "
                         f"{', '.join(_BIT_GENERATORS)}), got {state!r}")
    bit_generator = getattr(np.random, state["bit_generator"])()
    try:
        bit_generator.state = dict(state)
    except _BAD_STATE as exc:
        raise UsageError(f"{where}: not a valid {state['bit_generator']} state ({exc})") from exc
    return np.random.Generator(bit_generator)


def _plan_space(where: str, space: Any, state: Any, steps: list[Callable[[], None]]) -> None:
    if state is None:
        return
    if not isinstance(state, Mapping):
        raise UsageError(f"{where} must be a mapping, got {state!r}")
    generator = state.get("generator")
    if generator is not None:
        gen = _generator(where, generator)
        steps.append(lambda: setattr(space, "_np_random", gen))
    subs = state.get("spaces")
    own = getattr(space, "spaces", None)
    if subs is not None and own is not None:
        pairs = (list(zip(own.values(), subs.values(), strict=False)) if isinstance(own, dict)
                 and isinstance(subs, Mapping) else list(zip(own, subs, strict=False)))
        for i, (sub, sub_state) in enumerate(pairs):
            _plan_space(f"{where}.{i}", sub, sub_state, steps)


def _plan_rng(algo: BaseAlgorithm, venv: Any, rng: Any) -> Callable[[], None]:
    kind = type(algo).__name__
    if rng is None:
        warn(f"set_state(restore_rng=True): the tree has no {RNG_KEY}; this {kind} keeps "
             "its own generators", PartialStateWarning)
        return lambda: None
    if not isinstance(rng, Mapping):
        raise UsageError(f"{RNG_KEY} must be a mapping, got {rng!r}")
    steps: list[Callable[[], None]] = []
    python = rng.get("python")
    if python is not None:
        try:
            scratch = random.Random()
            scratch.setstate(_as_tuple(python))
        except _BAD_STATE as exc:
            raise UsageError(f"{RNG_KEY}.python: not a random.getstate() value ({exc})") from exc
        steps.append(lambda: random.setstate(_as_tuple(python)))
    numpy_state = rng.get("numpy")
    if numpy_state is not None:
        try:
            np.random.RandomState().set_state(_as_tuple(numpy_state))
        except _BAD_STATE as exc:
            raise UsageError(f"{RNG_KEY}.numpy: not a numpy.random.get_state() value "
                             f"({exc})") from exc
        steps.append(lambda: np.random.set_state(_as_tuple(numpy_state)))
    torch_state = rng.get("torch")
    if torch_state is not None:
        if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
            raise UsageError(f"{RNG_KEY}.torch must be a uint8 tensor (torch.get_rng_state())")
        steps.append(lambda: torch.set_rng_state(torch_state.cpu()))
    cuda = rng.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            steps.append(lambda: torch.cuda.set_rng_state_all([t.cpu() for t in cuda]))
        else:
            devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warn(f"set_state: the tree has the generators of {len(cuda)} CUDA device(s), "
                 f"this process has {devices}; they are not restored", PartialStateWarning)
    _plan_space(f"{RNG_KEY}.action_space", algo.action_space, rng.get("action_space"), steps)
    _plan_space(f"{RNG_KEY}.observation_space", algo.observation_space,
                rng.get("observation_space"), steps)
    envs = rng.get("envs")
    if envs is not None and venv is not None:
        if len(envs) != venv.num_envs:
            warn(f"set_state: the tree has the generators of {len(envs)} env(s), this {kind} "
                 f"has {venv.num_envs}; the envs keep their own", PartialStateWarning)
        else:
            for i, state in enumerate(envs):
                if state is not None:
                    steps.append(functools.partial(
                        venv.set_attr, "np_random", _generator(f"{RNG_KEY}.envs.{i}", state),
                        indices=[i]))

    def step() -> None:
        for s in steps:
            s()
    return step


def _as_tuple(value: Any) -> Any:
    """A decoded tree gives lists or tuples; the generators want tuples all the way."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def _plan_exploration(algo: BaseAlgorithm, exploration: Any) -> Callable[[], None]:
    steps: list[Callable[[], None]] = []
    if isinstance(exploration, Mapping):
        noise = getattr(algo, "action_noise", None)
        if noise is not None and exploration.get("action_noise") is not None:
            _plan_noise(noise, exploration["action_noise"], f"{EXPLORATION_KEY}.action_noise",
                        steps)
        gsde = exploration.get("gsde") or {}
        for name, _, dist in _gsde_holders(algo):
            for key, value in (gsde.get(name) or {}).items():
                current = getattr(dist, key, None)
                if not isinstance(value, torch.Tensor) or (
                        current is not None and value.shape != current.shape):
                    raise UsageError(f"{EXPLORATION_KEY}.gsde.{name}.{key}: expected a tensor "
                                     f"of shape {getattr(current, 'shape', None)}")
                device = current.device if current is not None else algo.device
                steps.append(functools.partial(setattr, dist, key,
                                               value.to(device, torch.float32).clone()))

    def step() -> None:
        for s in steps:
            s()
    return step


def _plan_noise(noise: Any, state: Any, where: str, steps: list[Callable[[], None]]) -> None:
    from stable_baselines3.common.noise import (
        OrnsteinUhlenbeckActionNoise,
        VectorizedActionNoise,
    )
    if isinstance(noise, VectorizedActionNoise):
        if not isinstance(state, Sequence) or len(state) != len(noise.noises):
            raise UsageError(f"{where}: expected one state per env ({len(noise.noises)})")
        for i, (sub, sub_state) in enumerate(zip(noise.noises, state, strict=True)):
            _plan_noise(sub, sub_state, f"{where}.{i}", steps)
    elif isinstance(noise, OrnsteinUhlenbeckActionNoise) and state is not None:
        prev = state.get("noise_prev") if isinstance(state, Mapping) else None
        if not isinstance(prev, np.ndarray) or prev.shape != np.shape(noise.noise_prev):
            raise UsageError(f"{where}.noise_prev: expected an array of shape "
                             f"{np.shape(noise.noise_prev)}")
        steps.append(lambda: setattr(noise, "noise_prev", prev.copy()))
