"""What `iommufd-cuse status` shows: a snapshot of the daemon (collect_status, built
without awaiting) and its readable table (format_status); the one line of STATUS=
(summary).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pwd
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..iommufd.debug import call_status, describe_context
from ..system import PAGE_SIZE

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)


MIB = 1 << 20


def version() -> str:
    try:
        return importlib.metadata.version("iommufd_cuse")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def add_user_names(st: dict[str, Any]) -> dict[str, Any]:
    """Fill in "user" next to each "uid". Name service lookups may block (LDAP,
    sssd): the daemon runs this in a worker thread, after the snapshot."""
    for item in [*st["contexts"], *st["accounting"]["user"]]:
        item["user"] = _user_name(item["uid"])
    return st


def _members(system: Any, name: str) -> list[Any]:
    """system.devices / system.groups, as a list or a dict, or absent."""
    things = getattr(system, name, None) or []
    return list(things.values()) if isinstance(things, Mapping) else list(things)


def _owner_name(owner: Any, contexts: dict[int, dict[str, Any]]) -> str:
    if owner is None:
        return "kernel"
    c = contexts.get(id(owner))
    if c is not None:
        return f"context {c['index']} (pid {c['pid']} {c['comm']})"
    return str(owner)


def _domain_name(group: Any, domains: dict[int, str]) -> str | None:
    dom = getattr(group, "domain", None)
    if dom is None:
        return None
    if dom is getattr(group, "default_domain", None):
        return "default"
    if dom is getattr(group, "blocking_domain", None):
        return "blocking"
    return domains.get(id(dom))


def _member(thing: Any, contexts: dict[int, dict[str, Any]], domains: dict[int, str]) -> dict[str, Any]:
    d = call_status(thing) if callable(getattr(thing, "status", None)) else {"name": repr(thing)}
    # Who owns the DMA and what translates it: a group's, or for a device its group's.
    group = thing if hasattr(thing, "owner") else getattr(thing, "group", None)
    if group is not None and hasattr(group, "owner"):
        d["owner"] = _owner_name(group.owner, contexts)
        name = _domain_name(group, domains)
        if name is not None:
            d["domain"] = name
    return d


def _device(daemon: Daemon, dev: Any, contexts: dict[int, dict[str, Any]], domains: dict[int, str]) -> dict[str, Any]:
    d = _member(dev, contexts, domains)
    node = getattr(dev, "node", None)
    if node is not None:  # its VFIO cdev
        d["node"] = daemon.link_path(node.path())
    return d


def collect_status(daemon: Daemon) -> dict[str, Any]:
    """A snapshot of the daemon, built without awaiting (so it is consistent) and
    without touching client memory, FUSE or the name service (so it cannot block
    the daemon); add_user_names() completes it."""
    system = daemon.system
    now = time.time()
    ctxs = sorted(system.contexts, key=lambda c: (c.opened_at, c.opener_pid))
    contexts = [describe_context(c, i + 1, now) for i, c in enumerate(ctxs)]
    by_id = {id(c): d for c, d in zip(ctxs, contexts, strict=True)}
    # Domains that iommufd objects (HWPTs) wrap, to name what a group is attached to.
    domains = {
        id(o.domain): f"hwpt {o.id} of context {d['index']}"
        for c, d in zip(ctxs, contexts, strict=True)
        for o in c.live_objects()
        if getattr(o, "domain", None) is not None
    }
    pinned = system.pinned_pages()
    acct = system.accounting
    return {
        "daemon": {
            "version": version(),
            "pid": os.getpid(),
            "uptime_s": round(now - daemon.server.start_time, 1),
            "backend": daemon.backend,
            "mountpoint": daemon.mountpoint,
            "devices": {daemon.link_path(p): f"{d[0]}:{d[1]}" for p, d in daemon.devts.items()},
            "nodes": [daemon.link_path(n.path()) for n in daemon.dev_nodes()],
        },
        "pinned_pages": pinned,
        "pinned_mib": round(pinned * PAGE_SIZE / MIB, 3),
        "accounting": {
            "user": [{"uid": u, "pages": n} for u, n in sorted(acct.user.items())],
            "mm": [{"pid": p, "pages": n} for p, n in sorted(acct.mm.items())],
        },
        "maps": system.maps,  # IOAS map / unmap operations that succeeded, since the start
        "unmaps": system.unmaps,
        "contexts": contexts,
        "devices": [_device(daemon, d, by_id, domains) for d in _members(system, "devices")],
        "groups": [_member(g, by_id, domains) for g in _members(system, "groups")],
    }


def summary(daemon: Daemon) -> str:
    """The one line for systemd's STATUS=."""
    system = daemon.system
    n = len(system.contexts)
    d = len(_members(system, "devices"))
    mib = system.pinned_pages() * PAGE_SIZE / MIB
    return f"{n} context{'s' * (n != 1)}, {d} device{'s' * (d != 1)}, {mib:.1f} MiB pinned"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v) or "-"
    return str(v)


def _fmt_fields(d: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k} {_fmt_value(v)}" for k, v in d.items() if k not in skip)


def _fmt_backing(b: Mapping[str, Any]) -> str:
    if b.get("kind") == "user":
        return f"user memory of pid {b.get('pid')} at {b.get('uptr', 0):#x}"
    if b.get("kind") == "file":
        return f"file at offset {b.get('offset', 0):#x}"
    return str(b.get("kind"))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def format_status(st: Mapping[str, Any]) -> str:
    """The readable table of `iommufd-cuse status`."""
    out: list[str] = []
    d = st["daemon"]
    out.append(f"iommufd-cuse {d['version']}: pid {d['pid']}, up {_duration(d['uptime_s'])}")
    if d.get("backend") == "cuse":
        devs = d["devices"]
        nodes = ", ".join(f"{n} ({devs.get(n, '?')})" for n in d["nodes"])
        out.append(f"nodes: {nodes} (character devices by CUSE)")
    else:
        out.append(f"nodes: {', '.join(d['nodes'])} (mounted at {d['mountpoint']}, by FUSE)")
    out.append(f"pinned: {st['pinned_pages']} pages ({st['pinned_mib']:.1f} MiB)")
    acct = st["accounting"]
    users = ", ".join(f"{a.get('user', a['uid'])} {a['pages']} pages" for a in acct["user"]) or "none"
    procs = ", ".join(f"pid {a['pid']} {a['pages']} pages" for a in acct["mm"]) or "none"
    out.append(f"accounted: per user: {users}; per process: {procs}")
    out.append(f"IOAS map/unmap operations: {st['maps']} maps, {st['unmaps']} unmaps")

    out.append("")
    if not st["contexts"]:
        out.append("contexts: none")
    for c in st["contexts"]:
        out.append(
            f"context {c['index']}: pid {c['pid']} ({c['comm']}), tid {c['tid']}, user {c.get('user', c['uid'])}, "
            f"open {_duration(c['age_s'])}, accounting {c['accounting']}, {c['pinned_pages']} pages pinned, "
            f"{c['maps']} maps, {c['unmaps']} unmaps"
        )
        out.append(f"  command: {' '.join(c['cmdline']) or '?'}")
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(c["objects_by_kind"].items())) or "none"
        out.append(f"  objects: {kinds}")
        for o in c["objects"]:
            if o["type"] == "ioas":
                out.append(
                    f"  ioas {o['id']}: {_plural(len(o['areas']), 'area')}, "
                    f"{_plural(o['domains'], 'domain')}, {o['pinned_pages']} pages pinned, "
                    f"users {o['users']}"
                )
                if o["areas"]:
                    out.append(f"    {'IOVA':<18}  {'LENGTH':>12}  PROT  {'PAGES':>7}  {'PINNED':>7}  BACKING")
                for a in o["areas"]:
                    out.append(
                        f"    {a['iova']:#018x}  {a['length']:#12x}  {a['prot']:<4}  {a['pages']:>7}  "
                        f"{a['pinned_pages']:>7}  {_fmt_backing(a['backing'])}"
                    )
            else:
                out.append(f"  {o['type']} {o['id']}: {_fmt_fields(o, ('id', 'type'))}")

    out.append("")
    for name, key in (("devices", "devices"), ("groups", "groups")):
        items = st.get(key) or []
        if not items:
            out.append(f"{name}: none")
            continue
        out.append(f"{name}:")
        for it in items:
            out.append(f"  {_fmt_fields(it)}")
    return "\n".join(out)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"
