"""Reading and editing sites from outside a model: ``list_sites``, ``capture``, ``intervene``.

They work on any linen module whose activations go through :func:`mechinterp.sites.site`.
Sites are addressed by canonical name (``"attn.z"``); a per-layer site is one array with a
leading ``layer`` axis, scanned or unrolled. Every intervention is checked against the
sites the forward reaches (``jax.eval_shape``, no compute) before anything runs.
:func:`intervention_variables` and :func:`read_sites` are the two steps ``capture`` and
``intervene`` take, for running ``model.apply`` yourself. Design notes: docs/sites.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import validate
from mechinterp.sweep_mesh import on_mesh
from mechinterp.activation_cache import ActivationCache
from mechinterp.interventions import Intervention
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec

Path = tuple[str, ...]
_INDEXED = re.compile(r"^(.*)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """One site of a model, for the given input shapes.

    ``paths`` are the module paths where the site is recorded: one path, or one per layer
    (in order) when unrolled layers are stacked into the leading axis (``stacked=True``).
    ``missing_layers``: the unrolled layers that lack this per-layer site (a model with
    dropped sublayers); such a site is listed but cannot be captured or edited.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str, ...] | None
    meaning: str | None
    paths: tuple[Path, ...]
    stacked: bool
    missing_layers: tuple[int, ...] = ()

    def __treescope_repr__(self, path, subtree_renderer):
        from mechinterp import treescope_repr

        return treescope_repr.site_info(self, path, subtree_renderer)


def site_table(model: nn.Module) -> Mapping[str, SiteSpec]:
    """The sites a model family declares (its class attribute ``SITES``), possibly empty."""
    return getattr(type(model), "SITES", {})


# ---------------------------------------------------------------------------------------
# Inputs: array leaves are traced, everything else (flags, None) is static.


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


@dataclasses.dataclass(frozen=True)
class _CallSignature:
    """The hashable, static part of a call: pytree structure, flags and array specs."""

    treedef: Any
    static: tuple  # per leaf: the value itself, or None where the leaf is an array
    specs: tuple  # per array leaf: (shape, dtype)

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> tuple["_CallSignature", list]:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        arrays = [leaf for leaf in leaves if _is_array(leaf)]
        static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
        specs = tuple((tuple(a.shape), np.dtype(a.dtype)) for a in arrays)
        return cls(treedef, static, specs), arrays

    def rebuild(self, arrays) -> tuple[tuple, dict]:
        it = iter(arrays)
        leaves = [next(it) if value is None else value for value in self.static]
        return jax.tree.unflatten(self.treedef, leaves)


def _hashable(*objs) -> bool:
    try:
        hash(objs)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Site discovery.


def _walk(tree: Mapping, prefix: Path = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _walk(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _layer_order(name: str, paths: list[Path]) -> list[Path]:
    """Order the paths of a site recorded once per unrolled layer (``layers_0``, ...).

    Raises if the paths are not one site repeated across indexed modules: site names must be
    unique within a model apart from that.
    """
    problem = ValueError(
        f"site {name!r} is recorded at several module paths {sorted(paths)} that are not "
        "one layer stack (modules named PREFIX_0, PREFIX_1, ...); give each activation a "
        "unique site name"
    )
    if len({len(p) for p in paths}) != 1:
        raise problem
    differing = [i for i in range(len(paths[0])) if len({p[i] for p in paths}) > 1]
    if len(differing) != 1:
        raise problem
    i = differing[0]
    matches = [_INDEXED.match(p[i]) for p in paths]
    if not all(matches) or len({m.group(1) for m in matches}) != 1:
        raise problem
    order = sorted(range(len(paths)), key=lambda k: int(matches[k].group(2)))
    if [int(matches[k].group(2)) for k in order] != list(range(len(paths))):
        raise problem
    return [paths[k] for k in order]


def _layer_counts(intermediates: Mapping) -> dict[str, int]:
    """``{prefix: number of modules PREFIX_0 ... PREFIX_n-1}`` over every recorded path."""
    counts: dict[str, int] = {}
    for path, _ in _walk(intermediates):
        for key in path[:-1]:
            if match := _INDEXED.match(key):
                prefix, index = match.group(1), int(match.group(2))
                counts[prefix] = max(counts.get(prefix, 0), index + 1)
    return counts


def _partial_stack(entries, spec, counts) -> SiteInfo | None:
    """A per-layer site (declared with a leading ``layer`` axis) that only some unrolled
    layers record, or a one-layer stack's (``PREFIX_0`` alone), as a :class:`SiteInfo`
    naming the layers that lack it; else ``None``."""
    if spec is None or spec.axes[:1] != ("layer",) or len({len(p) for p, _ in entries}) != 1:
        return None
    for k in range(len(entries[0][0])):
        matches = [_INDEXED.match(p[k]) for p, _ in entries]
        if not all(matches) or len({m.group(1) for m in matches}) != 1:
            continue
        present = sorted(int(m.group(2)) for m in matches)
        n_layers = counts[matches[0].group(1)]
        lone = len(entries) == 1 and len(spec.axes) == entries[0][1].ndim + 1
        if len(present) != n_layers or lone:
            order = sorted(range(len(entries)), key=lambda i: int(matches[i].group(2)))
            value = entries[0][1]
            return SiteInfo(
                name="", shape=(n_layers,) + tuple(value.shape), dtype=np.dtype(value.dtype),
                axes=spec.axes, meaning=spec.meaning,
                paths=tuple(entries[i][0] for i in order), stacked=True,
                missing_layers=tuple(sorted(set(range(n_layers)) - set(present))),
            )
    return None


def _site_infos(model: nn.Module, intermediates: Mapping) -> dict[str, SiteInfo]:
    by_name: dict[str, list[tuple[Path, Any]]] = {}
    for path, value in _walk(intermediates):
        by_name.setdefault(path[-1], []).append((path[:-1], value))
    table = site_table(model)
    counts = _layer_counts(intermediates)
    infos = {}
    for name, entries in by_name.items():
        partial = _partial_stack(entries, table.get(name), counts)
        if partial is not None:
            infos[name] = dataclasses.replace(partial, name=name)
            continue
        stacked = len(entries) > 1
        if stacked:
            order = _layer_order(name, [p for p, _ in entries])
            shapes = {tuple(v.shape) for _, v in entries}
            if len(shapes) != 1:
                raise ValueError(f"site {name!r} has different shapes across layers: {shapes}")
            value = entries[0][1]
            shape = (len(entries),) + tuple(value.shape)
            paths = tuple(order)
        else:
            (path, value), = entries
            shape, paths = tuple(value.shape), (path,)
        spec = table.get(name)
        if spec is not None and len(spec.axes) != len(shape):
            raise ValueError(
                f"{type(model).__name__}.SITES declares {name!r} with axes {spec.axes}, but "
                f"the forward records shape {shape}"
            )
        infos[name] = SiteInfo(
            name=name,
            shape=shape,
            dtype=np.dtype(value.dtype),
            axes=spec.axes if spec else None,
            meaning=spec.meaning if spec else None,
            paths=paths,
            stacked=stacked,
        )
    return infos


def _discover(model: nn.Module, signature: _CallSignature) -> dict[str, SiteInfo]:
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature.specs]

    def init(arrays):
        args, kwargs = signature.rebuild(arrays)
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, *args, mutable=True, **kwargs)

    variables = jax.eval_shape(init, specs)
    return _site_infos(model, variables.get(INTERMEDIATES, {}))


_discover_cached = functools.lru_cache(maxsize=256)(_discover)


def _sites_for(model, signature) -> dict[str, SiteInfo]:
    if _hashable(model, signature):
        return _discover_cached(model, signature)
    return _discover(model, signature)


def list_sites(model: nn.Module, *inputs, **kwargs) -> dict[str, SiteInfo]:
    """Every site the forward reaches on inputs of these shapes: name, shape, dtype, axes.

    Uses ``jax.eval_shape`` on ``model.init``: no parameters are needed and nothing is
    computed. ``inputs`` may be arrays or ``jax.ShapeDtypeStruct``s.
    """
    signature, _ = _CallSignature.of(inputs, kwargs)
    return dict(_sites_for(model, signature))


# ---------------------------------------------------------------------------------------
# Validation.


def _unknown_site_error(model, name, infos) -> KeyError:
    if name in site_table(model):
        return KeyError(
            f"site {name!r} exists in {type(model).__name__} but the forward never reaches "
            "it with these inputs and arguments, so an intervention there would do nothing"
        )
    close = difflib.get_close_matches(str(name), list(infos), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return KeyError(
        f"unknown site {name!r} for {type(model).__name__}{hint} "
        f"(mechinterp.list_sites lists all {len(infos)} sites)"
    )


def _check_whole(info: SiteInfo, owner: str) -> None:
    if info.missing_layers:
        raise ValueError(
            f"site {info.name!r} is absent in layers {list(info.missing_layers)} of this "
            f"{owner} (dropped sublayers), so it has no one layer axis; "
            "read or edit it on the model before dropping, or name a site every layer has"
        )


def _check_names(model, names, infos) -> None:
    for name in names:
        if name not in infos:
            raise _unknown_site_error(model, name, infos)
        _check_whole(infos[name], type(model).__name__)


def _check_intervention(name: str, intervention, info: SiteInfo) -> None:
    if not isinstance(intervention, Intervention):
        raise TypeError(
            f"interventions[{name!r}] is a {type(intervention).__name__}; expected a "
            "mechinterp.Intervention (e.g. Intervention.patch(value))"
        )
    for field, value in intervention.fields().items():
        shape = tuple(np.shape(value))
        dtype = jnp.result_type(value)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Intervention.{field} at site {name!r} has dtype {dtype}; it must be "
                f"floating (the mask is what jax.grad differentiates): use "
                f".astype({info.dtype.name})"
            )
        weak = isinstance(value, (int, float)) or getattr(value, "weak_type", False)
        if field == "add" and not weak and dtype != info.dtype:
            raise TypeError(
                f"Intervention.add at site {name!r} has dtype {dtype} but the site is "
                f"{info.dtype}: cast it with .astype(jnp.{info.dtype.name})"
            )
        try:
            broadcast = np.broadcast_shapes(shape, info.shape)
        except ValueError:
            broadcast = None
        if broadcast != info.shape:
            axes = f" (axes {info.axes})" if info.axes else ""
            raise ValueError(
                f"Intervention.{field} at site {name!r} has shape {shape}, which does not "
                f"broadcast to the site's shape {info.shape}{axes}"
            )


def _set_path(tree: dict, path: Path, name: str, value) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree[name] = value


def _intervention_tree(interventions: Mapping[str, Intervention], infos) -> dict:
    """Place each intervention at its module path(s), in the layout the model reads.

    Every field is broadcast to the site's rank and to its leading axis, so that
    ``nn.scan`` (which slices the leading axis of the collection per layer) and the per-layer
    slices of unrolled layers both see the right thing. Other axes stay as given.
    """
    tree: dict = {}
    for name, intervention in interventions.items():
        info = infos[name]
        fields = {}
        for field, value in intervention.fields().items():
            value = jnp.asarray(value)
            value = value.reshape((1,) * (len(info.shape) - value.ndim) + value.shape)
            fields[field] = jnp.broadcast_to(value, info.shape[:1] + value.shape[1:])
        if info.stacked:
            for layer, path in enumerate(info.paths):
                _set_path(tree, path, name, {k: v[layer] for k, v in fields.items()})
        else:
            _set_path(tree, info.paths[0], name, fields)
    return tree


def _check_params(params) -> None:
    if isinstance(params, Mapping) and set(params) == {"params"}:
        raise ValueError(
            "got the whole variables dict {'params': ...}; pass variables['params'] as params"
        )


# ---------------------------------------------------------------------------------------
# Running.


def read_sites(state: Mapping, infos: Mapping[str, SiteInfo], sites) -> dict[str, jax.Array]:
    """The activations of ``sites`` recorded in ``state``, laid out as :func:`capture`
    returns them (per-layer sites stacked on a leading layer axis).

    ``state``: the collections ``model.apply(..., mutable=["intermediates"])`` returns;
    ``infos``: the site infos of that call (from :func:`intervention_variables` or
    :func:`list_sites`). Works inside ``jit`` and under transformations.
    """
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    intermediates = state.get(INTERMEDIATES, {})

    def lookup(path, name):
        node = intermediates
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise KeyError(
                    f"site {name!r} was not recorded at module path {'/'.join(path)!r}: "
                    f"run model.apply with mutable=[{INTERMEDIATES!r}] and the same inputs "
                    "the site infos were made for"
                )
            node = node[key]
        if name not in node:
            raise KeyError(f"site {name!r} was not recorded at module path {'/'.join(path)!r}")
        return node[name]

    out = {}
    for name in names:
        if name not in infos:
            close = difflib.get_close_matches(str(name), list(infos), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"site {name!r} is not among the {len(infos)} given site infos{hint}")
        info = infos[name]
        _check_whole(info, "model")
        values = [lookup(path, name) for path in info.paths]
        out[name] = jnp.stack(values) if info.stacked else values[0]
    return out


def _apply(model, params, arrays, iv_vars, signature, infos_key, names):
    """One forward: with interventions, returning the requested sites (or none)."""
    args, kwargs = signature.rebuild(arrays)
    variables = {"params": params, **iv_vars}
    if names is None:
        return model.apply(variables, *args, **kwargs)
    outputs, state = model.apply(variables, *args, mutable=[INTERMEDIATES], **kwargs)
    return outputs, read_sites(state, dict(infos_key), names)


_apply_jit = jax.jit(_apply, static_argnames=("model", "signature", "infos_key", "names"))


def _checked_variables(model, signature, interventions, names=None):
    """The ``interventions`` variables and the site infos for one call, after checking
    every intervention (and the requested ``names``) against the sites it reaches."""
    infos = _sites_for(model, signature)
    if interventions is None:
        interventions = {}
    if not isinstance(interventions, Mapping):
        raise TypeError(
            f"interventions must be a dict {{site name: Intervention}}, got "
            f"{type(interventions).__name__}"
        )
    _check_names(model, interventions, infos)
    for name, intervention in interventions.items():
        _check_intervention(name, intervention, infos[name])
    if names is not None:
        _check_names(model, names, infos)
    tree = _intervention_tree(interventions, infos)
    return ({INTERVENTIONS: tree} if tree else {}), infos


def intervention_variables(model: nn.Module, *inputs, interventions, **kwargs
                           ) -> tuple[dict, dict[str, SiteInfo]]:
    """``(variables, site infos)`` for running ``model.apply`` yourself with
    ``interventions`` (``{site name: Intervention}``) on these inputs.

    ``variables`` is ``{"interventions": collection}`` (empty without interventions), laid
    out and checked exactly as :func:`intervene` does (unknown or unreached sites, wrong
    shapes and dtypes raise), to be merged into the variables of a call::

        variables, infos = mi.intervention_variables(model, tokens, interventions=ivs)
        out, state = model.apply({"params": params, **variables}, tokens,
                                 mutable=["intermediates"])
        cache = mi.read_sites(state, infos, ["resid_mid"])

    For what :func:`intervene` and :func:`capture` do not cover: a custom method
    interceptor, a ``jax.vjp`` through the forward, other mutable collections. Works on
    traced inputs (inside ``jit``); only their shapes and dtypes are used.
    """
    signature, _ = _CallSignature.of(inputs, kwargs)
    return _checked_variables(model, signature, interventions)


def _run(model, params, inputs, kwargs, interventions, names):
    _check_params(params)
    signature, arrays = _CallSignature.of(inputs, kwargs)
    iv_vars, infos = _checked_variables(model, signature, interventions, names)
    if _hashable(model, signature):
        infos_key = tuple(sorted(infos.items()))
        return _apply_jit(model, params, arrays, iv_vars, signature, infos_key, names)
    return _apply(model, params, arrays, iv_vars, signature, tuple(infos.items()), names)


def capture(model: nn.Module, params, *inputs, sites=None, interventions=None,
            check_finite: bool = False, mesh=None, rules=None, **kwargs):
    """Run the model and return ``(outputs, cache)``: the cache is an
    :class:`~mechinterp.activation_cache.ActivationCache`, a ``{site name: activation}`` dict.

    ``sites``: names to return (default: every site). Per-layer sites come with a leading
    layer axis. Activations are recorded before the site's own intervention (if any) is
    applied, and after every upstream one. Inside ``jit`` only the requested sites are
    materialized. ``check_finite=True`` raises
    :class:`~mechinterp.validate.NonFiniteError` naming the first site (in forward order
    of the returned dict) or the outputs holding NaN or inf (costs a host copy of each).
    Token ids are checked against the family's vocabulary (:mod:`mechinterp.validate`);
    ``mesh``/``rules``: run over a mesh (:meth:`mechinterp.sweep_mesh.Placement.call`).
    """
    validate.check_model_inputs(model, inputs, kwargs)
    params, inputs, kwargs, interventions = on_mesh(mesh, rules)(
        model, params, inputs, kwargs, interventions)
    if sites is None:
        signature, _ = _CallSignature.of(inputs, kwargs)
        names = tuple(sorted(_sites_for(model, signature)))
    elif isinstance(sites, str):
        names = (sites,)
    else:
        names = tuple(sites)
    outputs, cache = _run(model, params, inputs, kwargs, interventions, names)
    cache = ActivationCache(cache, site_table(model))
    if check_finite:
        validate.check_finite(cache, "site")
        validate.check_finite({"outputs": outputs} if hasattr(outputs, "shape") else {},
                              "model")
    return outputs, cache


def intervene(model: nn.Module, params, *inputs, interventions, **kwargs):
    """Run the model with ``interventions`` (``{site name: Intervention}``); return outputs.

    Compose with ``jax.vmap`` over the fields of the interventions (keeping the large
    ``add`` operand unbatched) to run a whole sweep as one computation.
    """
    validate.check_model_inputs(model, inputs, kwargs)
    return _run(model, params, inputs, kwargs, interventions, None)
