"""Griffe extension for the API pages: the docstrings' Sphinx roles (``:func:`kfoc```,
``:meth:`~kronsum.Kron.solve```, …) become Markdown that mkdocstrings renders — a cross-reference
``[`kfoc`][kronsum.kfoc]`` when the target is a public object the API pages document, else an
inline code span. Short targets are looked up as ``kronsum.<target>``, then in the documented
object's own class and module."""

from __future__ import annotations

import importlib
import inspect
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|attr|mod|data|obj|exc):`(~?)([^`]+?)`")
MODULES = ("kronsum", "kronsum.adapters.torch", "kronsum.adapters.jax", "kronsum.adapters.laplace")


def _public() -> tuple[set, dict]:
    """The identifiers the API pages render, and canonical class/module paths → public ones."""
    public, canonical = set(), {}
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # an optional framework missing: its names stay plain code
            continue
        public.add(modname)
        canonical[modname] = modname
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            path = f"{modname}.{name}"
            public.add(path)
            if inspect.isclass(obj):
                canonical[f"{obj.__module__}.{obj.__qualname__}"] = path
                public.update(f"{path}.{m}" for m in vars(obj) if not m.startswith("_"))
            elif callable(obj) and hasattr(obj, "__module__"):
                canonical.setdefault(obj.__module__, modname)
    return public, canonical


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the package once it is loaded."""

    def __init__(self) -> None:
        self.public, self.canonical = _public()

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._walk(pkg)

    def _walk(self, obj) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(lambda m: self._link(m, obj), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)

    def _link(self, m: re.Match, obj) -> str:
        tilde, target = m.group(1), m.group(2).strip().rstrip("()")
        text = target.rsplit(".", 1)[-1] if tilde else target
        scopes = ["", "kronsum."]
        owner = obj if obj.is_class else obj.parent
        while owner is not None:
            public = self.canonical.get(owner.path)
            if public:
                scopes.append(public + ".")
            owner = owner.parent
        for scope in scopes:
            if scope + target in self.public:
                return f"[`{text}`][{scope + target}]"
        return f"`{text}`"
