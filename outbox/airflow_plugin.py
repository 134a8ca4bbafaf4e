"""Makes ``airflow triggerer`` construct outbox's shared-stream manager, with no change to
Airflow, DAGs or triggers.

Switch: ``pip install 'shared-stream-outbox[airflow]'`` and set ``[outbox] database_url`` in
Airflow's configuration (airflow.cfg, or ``AIRFLOW__OUTBOX__DATABASE_URL``). ``[outbox]
manager_class`` (default ``outbox.airflow.SharedStreamManager``) names the class to construct
instead of Airflow's own.

How: the wheel registers this module in Airflow's ``airflow.policy`` entry-point group.
``import airflow`` runs ``airflow.settings.initialize()``, which imports every such entry point
(pluggy) in every Airflow process, before ``airflow_local_settings`` and before anything can
import the triggerer. If ``[outbox] database_url`` is set, this module then arranges that when
``airflow.jobs.triggerer_job_runner`` is imported (the ``airflow triggerer`` command; also
Airflow's health check and ``airflow standalone``), that module's ``SharedStreamManager`` name,
the class ``TriggerRunner.__init__`` constructs, is rebound to ``[outbox] manager_class``,
imported at that moment. The runner is forked from the triggerer's supervisor (a bare
``os.fork``), so it inherits the rebinding; a runner started by fork+exec would import
``airflow`` again and get it the same way. Nothing else is touched:
``airflow.triggers.shared_stream`` keeps Airflow's own manager. Without ``[outbox]
database_url`` nothing happens at all.

It never breaks ``import airflow``: an error reading the configuration or importing the class is
logged as one line and Airflow keeps its own manager. Importing it runs ``outbox/__init__``
(about 40 ms once Airflow's own imports are done); the manager class is imported only with the
triggerer's module.

Without the entry point (outbox on the path but not installed as a distribution), the same in
two lines of ``airflow_local_settings.py``::

    from outbox.airflow_plugin import install
    install("outbox.airflow.SharedStreamManager")
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

SECTION = "outbox"
DEFAULT_MANAGER_CLASS = "outbox.airflow.SharedStreamManager"
TRIGGERER_MODULE = "airflow.jobs.triggerer_job_runner"
MANAGER_NAME = "SharedStreamManager"

log = logging.getLogger(__name__)


def configured_manager_class() -> str | None:
    """The class path to construct in Airflow's triggerer, or None when outbox is not
    switched on (no ``[outbox] database_url``)."""
    from airflow.configuration import conf

    if not conf.get(SECTION, "database_url", fallback=None):
        return None
    path: str = conf.get(SECTION, "manager_class", fallback=None) or DEFAULT_MANAGER_CLASS
    return path


def import_class(path: str) -> type[Any]:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path to a class")
    cls = getattr(importlib.import_module(module_name), name)
    if not isinstance(cls, type):
        raise TypeError(f"{path} is not a class")
    return cls


def install(manager_class: str) -> None:
    """Have ``airflow.jobs.triggerer_job_runner`` construct ``manager_class`` (a dotted path):
    rebind the name now if that module is already imported, else as soon as it is."""
    module = sys.modules.get(TRIGGERER_MODULE)
    if module is not None:
        _rebind(module, manager_class)
        return
    if not any(isinstance(f, _RebindOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RebindOnImport(manager_class))


def _rebind(module: ModuleType, manager_class: str) -> None:
    try:
        cls = import_class(manager_class)
    except Exception as exc:
        log.error(
            "outbox: cannot import [outbox] manager_class %s (%s: %s); "
            "the triggerer keeps Airflow's own SharedStreamManager",
            manager_class,
            type(exc).__name__,
            exc,
        )
        return
    setattr(module, MANAGER_NAME, cls)
    log.info("outbox: the triggerer constructs %s as its shared-stream manager", manager_class)


class _RebindOnImport(importlib.abc.MetaPathFinder):
    """Finds the triggerer module through the other finders and wraps its loader, so that
    the manager name is rebound right after the module body ran."""

    def __init__(self, manager_class: str) -> None:
        self.manager_class = manager_class
        self._finding = False

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != TRIGGERER_MODULE or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RebindingLoader(spec.loader, self)
        return spec


class _RebindingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, finder: _RebindOnImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _rebind(module, self._finder.manager_class)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... for tracebacks
        return getattr(self._loader, name)


def _activate() -> None:
    try:
        manager_class = configured_manager_class()
        if manager_class is not None:
            install(manager_class)
    except Exception as exc:
        log.error(
            "outbox: not switching Airflow's triggerer to outbox (%s: %s)",
            type(exc).__name__,
            exc,
        )


_activate()
