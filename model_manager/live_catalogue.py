"""The catalogue while the manager runs: fragments taken in (``reload``), models removed, aliases made.

The main YAML's models are fixed; the fragments' (``catalogue``) come and go. A change reaches a model only at rest
(no worker, nothing queued): a removed or edited model that is serving is unloaded once idle and changed then, and
the next look (each tick while something waits, else on a reload) finishes it. ``model.added`` and
``model.removed`` say so to subscribers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

from model_client import protocol
from model_client.errors import BadRequest, Busy, ModelNotFound
from model_manager.catalogue import read_catalogue, signature, write_fragment
from model_manager.config import Config, ModelName, ModelSpec
from model_manager.lifecycle import Lifecycle
from model_manager.slots import Waiter
from model_manager.status import catalogue_entry
from model_manager.worker_events import Outbox

EVENT_MODEL_ADDED = protocol.EVENT_MODEL_ADDED
EVENT_MODEL_REMOVED = protocol.EVENT_MODEL_REMOVED

log = structlog.get_logger("model_manager.catalogue")


class LiveCatalogue:
    def __init__(self, config: Config, lifecycle: Lifecycle, outbox: Outbox) -> None:
        self.settings = config.catalogue
        self.defaults = config.defaults
        self.lifecycle = lifecycle
        self.outbox = outbox
        self.fixed = set(config.models)  # the main YAML's: not removable at run time
        self.folder = Path(self.settings.dir)
        self.models_dir = Path(self.settings.models_dir)
        self.aliases: dict[str, str] = {}
        self.files: dict[str, Path] = {}
        self.sources: dict[str, dict[str, Any]] = {}
        self.problems: dict[str, str] = {}
        self.removing: dict[str, list[Waiter]] = {}  # removed models still unloading, and who waits for them
        self.doomed: dict[str, ModelSpec] = {}  # models `remove` took out: their pulled files go with them
        self.waiting: set[str] = set()  # changes deferred until their model is at rest
        self._signature: tuple = ()
        self._next_look = 0.0

    # ----- names ----------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """A model's name for ``name`` (an alias leads to its model); a model being removed is not found."""
        target = self.aliases.get(name, name)
        if target in self.removing:
            raise ModelNotFound(f"model {name!r} is being removed", model=name)
        return target

    def entries(self) -> list[dict[str, Any]]:
        """The ``models`` op's list: every model, then every alias (its model's entry under its own name)."""
        slots = self.lifecycle.slots
        listed = [{**catalogue_entry(slot), **self._origin(name)} for name, slot in slots.items()]
        for alias, target in sorted(self.aliases.items()):
            if target in slots:
                listed.append({**catalogue_entry(slots[target]), "name": alias, "alias_of": target})
        return listed

    def _origin(self, name: str) -> dict[str, Any]:
        if name in self.fixed:
            return {"origin": "config"}
        return {"origin": "pulled" if self.sources.get(name) else "fragment", "source": self.sources.get(name) or None}

    # ----- reload ---------------------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Take the fragments as they are now; what changed, what waits for its model to be at rest, what is
        broken (by file)."""
        self._signature = signature(self.folder)
        found = read_catalogue(self.folder, self.defaults, self.fixed)
        slots = self.lifecycle.slots
        current = {name for name in slots if name not in self.fixed}
        added, removed, changed, deferred = [], [], [], []
        for name in sorted(found.models.keys() - current):
            self.lifecycle.add_model(name, found.models[name])
            added.append(name)
            self.outbox.publish(EVENT_MODEL_ADDED, model=name, kind=found.models[name].kind)
        for name in sorted(current - found.models.keys()):
            if self.lifecycle.retire(name, reason="removed"):
                removed.append(name)
                self._removed(name)
            else:
                deferred.append(name)
        for name in sorted(current & found.models.keys()):
            if slots[name].spec != found.models[name]:
                (changed if self.lifecycle.respec(name, found.models[name]) else deferred).append(name)
        self.aliases, self.files, self.sources = found.aliases, found.files, found.sources
        self.problems = found.problems
        self.waiting = set(deferred)
        if added or removed or changed or deferred or found.problems:
            log.info(
                "catalogue_reloaded",
                added=added,
                removed=removed,
                changed=changed,
                deferred=deferred,
                problems=found.problems,
            )
        return {
            "added": added,
            "removed": removed,
            "changed": changed,
            "deferred": deferred,
            "aliases": dict(self.aliases),
            "problems": dict(found.problems),
        }

    def tick(self, now: float) -> None:
        """Finish deferred changes; with ``watch_s``, take fragments changed on disk."""
        changed = False
        if self.settings.watch_s and now >= self._next_look:
            self._next_look = now + self.settings.watch_s
            changed = signature(self.folder) != self._signature
        if changed or (self.waiting and any(self._at_rest(name) for name in self.waiting)):
            self.reload()

    def _at_rest(self, name: str) -> bool:
        slot = self.lifecycle.slots.get(name)
        return slot is None or self.lifecycle.at_rest(slot)

    def _removed(self, name: str) -> None:
        """A model has left the catalogue: its pulled files and aliases go, its waiters get their answer."""
        freed = self._delete_files(name)
        self.outbox.publish(EVENT_MODEL_REMOVED, model=name, reason="removed")
        for waiter in self.removing.pop(name, []):
            self.outbox.send(
                waiter.route, protocol.encode_result(waiter.request_id, {"removed": name, "freed_bytes": freed})
            )

    def _delete_files(self, name: str) -> int:
        """The pulled folder the model's files are in (only under ``models_dir``, and not shared); bytes freed."""
        spec = self.doomed.pop(name, None)
        if spec is None:
            return 0  # a fragment deleted by hand: its files are left where they are
        try:
            folder = self.models_dir / Path(spec.path).resolve().relative_to(self.models_dir.resolve()).parts[0]
        except (ValueError, IndexError):
            return 0  # not a pulled file: a hand-written fragment's file is the person's own
        shared = any(
            Path(slot.spec.path).resolve().is_relative_to(folder.resolve()) for slot in self.lifecycle.slots.values()
        )
        if shared or not folder.exists():
            return 0
        freed = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        log.info("pulled_files_deleted", model=name, folder=str(folder), freed_mib=round(freed / 2**20, 1))
        return freed

    # ----- what clients ask -----------------------------------------------------------------------------------

    def remove(self, name: str, waiter: Waiter) -> dict[str, Any] | None:
        """Remove a model (its fragment, then, once it is at rest, its pulled files) or an alias. The answer now, or
        None when it comes once the model has unloaded. A model in use is refused (``busy``)."""
        if name in self.aliases:
            self.files.pop(name).unlink(missing_ok=True)
            target = self.aliases.pop(name)
            self._signature = signature(self.folder)
            self.outbox.publish(EVENT_MODEL_REMOVED, model=name, reason="removed", alias_of=target)
            return {"removed": name, "alias_of": target, "freed_bytes": 0}
        if name in self.fixed:
            raise BadRequest(f"model {name!r} is declared in the main YAML: remove it there (and restart)", model=name)
        slot = self.lifecycle.slots.get(self.resolve(name))
        if slot is None or name not in self.files:
            raise ModelNotFound(f"model {name!r} is not in the catalogue", model=name)
        if slot.busy or slot.load_waiters:
            raise Busy(
                f"model {name!r} is in use ({len(slot.running)} running, {len(slot.queue)} queued): try again when "
                "its requests are done",
                model=name,
                running=len(slot.running),
                queued=len(slot.queue),
            )
        self.files.pop(name).unlink(missing_ok=True)
        for alias in [a for a, target in self.aliases.items() if target == name]:
            self.files.pop(alias).unlink(missing_ok=True)  # its other names go with it
            del self.aliases[alias]
        self.doomed[name] = slot.spec
        self.removing.setdefault(name, []).append(waiter)
        self.reload()
        return None

    def copy(self, source: str, destination: str) -> dict[str, Any]:
        """``destination`` becomes a second name of ``source``'s model (the same weights, loaded once)."""
        target = self.resolve(source)
        if target not in self.lifecycle.slots:
            raise ModelNotFound(f"model {source!r} is not in the catalogue", model=source)
        try:
            msgspec.convert(destination, ModelName)
        except msgspec.ValidationError:
            raise BadRequest(f"{destination!r} is not a valid model name", field="destination") from None
        if destination in self.lifecycle.slots or destination in self.aliases:
            raise BadRequest(f"the name {destination!r} is taken", field="destination")
        write_fragment(self.folder, destination, {"alias_of": target}, comment=f"A second name for {target}.")
        self.reload()
        if destination not in self.aliases:
            raise BadRequest(f"the alias could not be made: {self.problems}", field="destination")
        return {"model": destination, "alias_of": target}

    def add_pulled(self, name: str, model: dict[str, Any], source: dict[str, Any], comment: str) -> dict[str, Any]:
        """Write a pulled model's fragment (its files are verified) and take it in; the reload's answer."""
        write_fragment(self.folder, name, {"model": model, "source": source}, comment=comment)
        return self.reload()

    def status(self) -> dict[str, Any]:
        return {
            "dir": str(self.folder),
            "aliases": dict(self.aliases),
            "problems": dict(self.problems),
            "removing": sorted(self.removing),
            "checked_at": time.time(),
        }
