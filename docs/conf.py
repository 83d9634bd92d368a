"""Sphinx configuration of the documentation site: the pages of docs/ and an API reference from the docstrings.

Build it with ``bash scripts/docs.sh`` (warnings are errors there, so a broken cross-reference fails the build).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path

from sphinx import addnodes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package as checked out, installed or not

import lightning_hypergrad  # noqa: E402

project = "lightning_hypergrad"
release = version = lightning_hypergrad.__version__
copyright = "the lightning_hypergrad authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "requirements.txt"]
html_theme = "alabaster"
html_title = f"lightning_hypergrad {release}"

# --- the Markdown pages (the same files GitHub renders) ---
# Their links to sections (results.md#speed-on-one-device) use GitHub's heading anchors, up to level 4.
myst_heading_anchors = 4

# --- the API reference ---
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # defaults as written (DAMPING_ONE_OVER_LR), not their repr
# A method that overrides Lightning's without a docstring of its own is left out, rather than shown with Lightning's
# docstring (whose references point into Lightning's documentation).
autodoc_inherit_docstrings = False
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Every cross-reference must resolve: a :class:`Name` that names nothing documented is a warning, an error in CI.
nitpicky = True
# Names from other projects (the signatures' type hints: torch.Tensor, lightning's Trainer, ...) are not documented
# here, and no inventory of theirs is fetched (the build works offline): they stay plain text.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|lightning|pytorch_lightning|lightning_fabric|torchmetrics|torchvision|jsonargparse)(\..+)?"),
    (r"py:.*", r"(numpy|np|sklearn|wandb|learn2learn)(\..+)?"),
    (r"py:.*", r"(abc|argparse|collections(\.abc)?|contextlib|dataclasses|datetime|enum|os|pathlib|signal|types)\.\w+"),
    (r"py:.*", r"(Tensor|Path|Enum|Module)"),  # bare names that the base-class lines of autodoc print
    (r"py:class", r"lightning_hypergrad\.inner_model\.V"),  # a TypeVar of a signature
]


# --- one object, several import paths ---
# The package re-exports its classes (lightning_hypergrad.Greedy is lightning_hypergrad.estimators.greedy.Greedy),
# and a docstring names an object the way its module sees it (:class:`BilevelModule` in the command line's module).
# Each object is documented once. A reference that Sphinx does not find by its name is looked up the way Python
# would (in the referring class, its module, then as a dotted path): an object of this package that is documented
# gets the link, an object of another project stays plain text (as the names of nitpick_ignore_regex do), and
# anything else (a name that gives no object, or an object of this package documented nowhere) stays a warning.


def _lookup(path: str):
    """The object that the dotted ``path`` names (a module, then attributes), or None."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except (ImportError, ValueError):  # ValueError: an empty name (``a..b``)
            continue
        try:
            for name in parts[cut:]:
                obj = inspect.getattr_static(obj, name) if inspect.isclass(obj) else getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def _key(obj) -> int:
    return id(getattr(obj, "__func__", obj))  # a classmethod or a staticmethod: its function


def _home(obj) -> str:
    """The module that defines ``obj`` ("" where it cannot tell)."""
    obj = getattr(obj, "__func__", obj)
    obj = getattr(obj, "fget", obj)  # a property: its getter
    return getattr(obj, "__module__", None) or ""


def _documented(env) -> dict[int, str]:
    """The documented objects of this package by identity (each with the name it is documented under)."""
    domain = env.domains["py"]
    cache = getattr(env, "_hypergrad_documented", None)
    if cache is None or cache[0] != len(domain.objects):
        found = {}
        for name, entry in domain.objects.items():
            if not entry.aliased and name.startswith("lightning_hypergrad"):
                obj = _lookup(name)
                if obj is not None:
                    found.setdefault(_key(obj), name)
        cache = (len(domain.objects), found)
        env._hypergrad_documented = cache
    return cache[1]


def _scopes(node) -> list[tuple[str, type | None]]:
    """Where the reference is looked up, innermost first: the class it is in (and where it is defined), the module."""
    module, cls = node.get("py:module"), node.get("py:class")
    scopes: list[tuple[str, type | None]] = []
    if module and cls:
        owner = _lookup(f"{module}.{cls}")
        owner = owner if inspect.isclass(owner) else None
        scopes.append((f"{module}.{cls}", owner))
        if owner is not None and owner.__module__ != module:  # documented where it is re-exported
            scopes += [(f"{owner.__module__}.{owner.__qualname__}", owner), (owner.__module__, None)]
    if module:
        scopes.append((module, None))
    return scopes + [("", None)]


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    documented = _documented(env)
    domain = env.domains["py"]
    target = node["reftarget"].lstrip(".")
    head, _, last = target.rpartition(".")

    def link(name):
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)

    for scope, owner in _scopes(node):
        obj = _lookup(f"{scope}.{target}" if scope else target)
        if obj is not None and _key(obj) in documented:
            return link(documented[_key(obj)])
        # an attribute of a class (``names``, ``InnerModel.names``): documented on the class or on a base class,
        # where the class overrides a method without a docstring or sets the attribute in __init__
        cls = _lookup(f"{scope}.{head}" if scope else head) if head else owner
        if inspect.isclass(cls):
            for base in cls.__mro__:
                if _key(base) in documented and f"{documented[_key(base)]}.{last}" in domain.objects:
                    return link(f"{documented[_key(base)]}.{last}")
                if last in vars(base) and not base.__module__.startswith("lightning_hypergrad"):
                    return contnode  # inherited from another project (Lightning's ``setup``): plain text
        if obj is not None:
            home = obj.__name__ if inspect.ismodule(obj) else _home(obj)
            if home and not home.startswith("lightning_hypergrad"):
                return contnode  # another project's object: plain text
            return None  # an object of this package documented nowhere: the warning stands
    return None


_REPR = re.compile(r"<factory>|<function ([\w.]+)(?: at 0x[0-9a-f]+)?>|<class '([\w.]+)'>")


def _readable_defaults(app, what, name, obj, options, signature, return_annotation):
    """The defaults that autodoc shows as their repr where it has no source text (a dataclass's ``__init__``):
    ``<factory>`` becomes ``...`` and ``<function _no_files>`` its name, so that the signature parses as Python
    (one that does not is shown split at every comma)."""
    if not signature or "<" not in signature:
        return None
    readable = _REPR.sub(lambda m: m.group(1) or m.group(2) or "...", signature)
    return readable, return_annotation


def _skip_field_defaults(app, what, name, obj, skip, options):
    """A function stored in a class under another name is a field's default (``DatasetSpec.check_files``), not a
    method: the class's Attributes section documents the field."""
    if what == "class" and inspect.isfunction(obj) and obj.__name__ != name:
        return True
    return None


def _public_bases(app, name, obj, options, bases):
    """A class's base line names its public bases: a private base (``_WeightedGreedy``) gives way to its own."""

    def public(base):
        if base.__name__.startswith("_") and base.__module__.startswith("lightning_hypergrad"):
            return [b for parent in base.__bases__ for b in public(parent)]
        return [base]

    bases[:] = list(dict.fromkeys(b for base in bases for b in public(base)))


# --- links from the pages to files outside docs/ ---
# The pages link to files of the repository (../studies/<study>/results/table2.md), which GitHub shows. Sphinx
# takes a ``.md`` file outside docs/ for a page it cannot find; such a link becomes a download of the file, the way
# the site already treats any other file (the figures are copied in).


def _outside_files(app, doctree):
    srcdir = Path(app.srcdir).resolve()
    for node in list(doctree.findall(addnodes.pending_xref)):
        if node.get("refdomain") != "doc" or node.get("reftype") != "myst":
            continue
        path = Path(node["reftarget"])
        if not path.is_absolute() or path.is_relative_to(srcdir):
            continue
        for suffix in app.config.source_suffix:
            if path.with_name(path.name + suffix).is_file():
                target = os.path.relpath(path.with_name(path.name + suffix), srcdir / Path(node["refdoc"]).parent)
                link = addnodes.download_reference(
                    refdomain=None, reftype="myst", reftarget=target, refdoc=node["refdoc"], refexplicit=True
                )
                link += node.children
                link.source, link.line = node.source, node.line
                node.replace_self(link)
                break


def _napoleon_without_attribute_types(app):
    """Napoleon reads the first line of an attribute's docstring as ``type: description``; these docstrings take
    the type from the annotation and use colons in prose ("the short name of the estimator: the head of its spec
    string"), so attribute, data and property docstrings pass through napoleon unchanged."""
    from sphinx.ext import napoleon

    listeners = [
        listener
        for listener in app.events.listeners["autodoc-process-docstring"]
        if listener.handler is napoleon._process_docstring
    ]
    if len(listeners) != 1:
        raise RuntimeError(
            "docs/conf.py: napoleon's docstring handler is not where this Sphinx version was expected to keep it"
        )
    app.disconnect(listeners[0].id)

    def process(app, what, name, obj, options, lines):
        if what not in {"attribute", "data", "property"}:
            napoleon._process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process, priority=listeners[0].priority)


def setup(app):
    _napoleon_without_attribute_types(app)
    app.connect("missing-reference", _resolve_alias, priority=400)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-skip-member", _skip_field_defaults)
    app.connect("autodoc-process-signature", _readable_defaults)
    # before the collector that copies the downloads (priority 500) sees the document
    app.connect("doctree-read", _outside_files, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
