"""Named activation sites: the one convention every model family follows.

Inside a linen module, every activation worth studying goes through :func:`site`::

    x = site(self, "attn.z", x)

which (1) sows ``x`` into the ``intermediates`` collection (free unless that collection is
mutable in this ``apply``) and (2) applies the entry for this site in the ``interventions``
collection, if there is one. Site names are canonical and shared across families; each
family lists its sites, with their axes, in a class attribute ``SITES``
(``{name: SiteSpec}``) that the analysis code and the docs read.

Per-layer sites live inside ``nn.scan``ned layers, whose ``variable_axes`` include both
collections, so they carry a leading ``layer`` axis there.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from mechinterp.interventions import Intervention

INTERMEDIATES = "intermediates"
INTERVENTIONS = "interventions"
SITE_COLLECTIONS = (INTERMEDIATES, INTERVENTIONS)


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """What a family declares about one of its sites: axis names and a one-line meaning."""

    axes: tuple[str, ...]
    meaning: str


class _Unset:
    """Marks a site not yet recorded in this ``apply``."""


def _record_once(previous, value):
    if not isinstance(previous, _Unset):
        raise ValueError(
            "a site was recorded twice in one module call; give each activation its own "
            "site name (or call the module once per apply)"
        )
    return value


def site(module: nn.Module, name: str, x):
    """Record ``x`` as site ``name`` and apply this site's intervention, if any."""
    module.sow(INTERMEDIATES, name, x, init_fn=_Unset, reduce_fn=_record_once)
    if module.has_variable(INTERVENTIONS, name):
        fields = module.get_variable(INTERVENTIONS, name)
        x = Intervention(**fields).apply(x)
    return x


def site_is_used(module: nn.Module, name: str) -> bool:
    """Whether this apply reads or edits site ``name``.

    Lets a module skip work that exists only to expose a site (for example each head's
    separate write to the residual stream) when nobody looks at it.
    """
    return module.is_mutable_collection(INTERMEDIATES) or module.has_variable(
        INTERVENTIONS, name
    )
