"""Publishing and second-factor rules (pure logic): who sees which resource, from where, on
which hosts, and which second factor a login needs.

A resource is visible to a login when it is enabled and its filter allows the user (by name
or by one of the user's groups), the client's address and the gateway the login came
through. A user's groups are the directory's (LDAP or the built-in user record) plus the
built-in groups (``GroupRecord``) that list the user as a member.

Second factor: the factor rules (from ``[[factor_rules]]`` and the admin API) are tried by
``order``, then name; the first whose filter allows the login decides. When none does, a user
with a TOTP secret enrolled needs TOTP and others need nothing (the behaviour before rules).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ras.broker.model import Balancing, Factor, FactorRule, GroupRecord, PoolRecord, ResourceRecord

__all__ = ["Placement", "factor_for", "groups_of", "placement", "visible"]


def groups_of(user: str, groups: Iterable[str], records: Iterable[GroupRecord]) -> tuple[str, ...]:
    """The directory's groups and the built-in groups the user is a member of."""
    result = list(groups)
    seen = {g.casefold() for g in result}
    folded = user.casefold()
    for record in records:
        if record.name.casefold() not in seen and folded in (m.casefold() for m in record.members):
            result.append(record.name)
            seen.add(record.name.casefold())
    return tuple(result)


def visible(
    resources: Iterable[ResourceRecord],
    user: str,
    groups: Sequence[str],
    client: str,
    gateway: str,
) -> list[ResourceRecord]:
    """The resources this login may see and launch, in the given order."""
    return [r for r in resources if r.enabled and r.filter.allows(user, groups, client, gateway)]


def factor_for(
    rules: Iterable[FactorRule],
    user: str,
    groups: Sequence[str],
    client: str,
    gateway: str,
    *,
    has_totp: bool,
) -> tuple[Factor, str]:
    """The second factor this login needs, and the rule that says so (for the log)."""
    for rule in sorted(rules, key=lambda r: (r.order, r.name.casefold())):
        if rule.filter.allows(user, groups, client, gateway):
            return rule.factor, f"rule {rule.name}"
    if has_totp:
        return Factor.TOTP, "enrolled in TOTP"
    return Factor.NONE, "no rule"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a resource runs: candidate host names (None: every host), and how to choose."""

    hosts: tuple[str, ...] | None
    method: Balancing
    turn_key: str


def placement(
    resource: ResourceRecord,
    pools: Iterable[PoolRecord],
    pool_members: dict[str, list[str]],
    default: Balancing,
) -> Placement:
    """The hosts of ``resource`` (its own and its pools' members) and the balancing method:
    its first pool's (round robin takes turns within that pool), else the broker's default.
    ``pool_members``: case-folded pool name -> host names."""
    by_name = {p.name.casefold(): p for p in pools}
    hosts = list(resource.hosts)
    for pool in resource.pools:
        hosts += pool_members.get(pool.casefold(), [])
    if resource.pools:
        first = by_name.get(resource.pools[0].casefold())
        method = first.balancing if first is not None else default
        turn_key = f"pool:{resource.pools[0].casefold()}"
    else:
        method, turn_key = default, f"resource:{resource.id}"
    if not (resource.hosts or resource.pools):
        return Placement(None, method, turn_key)
    # An empty pool publishes on no host (not on every host).
    return Placement(tuple(dict.fromkeys(hosts)), method, turn_key)
