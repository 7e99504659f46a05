"""The sidecar's lifecycle: activate, unlock, serve, renew, drop.

One thread per configured model runs its activation/renewal loop; the socket server only ever
reads the slot's state.  The rules, in the order they are applied:

* A token is accepted only through :func:`layerlock.verifier.unlock.accept_token`.
* Renewal is due at the token's ``rna`` (about two thirds of its life); failures back off
  exponentially with jitter, between ``retry_min`` and ``retry_max``, and never sooner than the
  server's ``Retry-After`` (itself jittered and capped: :func:`retry_delay`).
* The server *cannot be asked* (network error, timeout, 5xx) or gives a *transient* answer
  (``rate_limited``, ``busy``, ``stale_request``, ``replay``, ``bad_signature`` — answers an
  outsider can provoke without the machine key, e.g. by flooding a machine code): keep serving
  until ``exp``, then drop.  A model not yet unlocked tries the cached token instead (restart
  during an outage or a flood).
* The server *answers no* definitively (:data:`layerlock.shared.errors.DEFINITIVE`: revoked,
  expired, no_license, machine_inactive, unknown_machine, not_enrolled, unknown_model,
  suite_required): drop at once, forget the cached token, refuse clients with that reason.
  Retries continue slowly, so a re-issued license heals.
* A server token signed by a key that is not pinned (the server rotated its signing key): fetch
  the JWKS (at most once a minute), pin the keys endorsed by already-pinned ones
  (:func:`layerlock.shared.tokens.extend_pinned`), persist them and try the token once more.
* ``seats_exhausted`` is transient (see :class:`layerlock.shared.errors.Denial`): the model stays
  ``locked`` with that reason and the loop retries on its back-off until a seat frees.
* While the server cannot be asked, a newer token in the cache (``layerlock-verifier import``
  on an air-gapped site) replaces the one in use.
* The clock (:mod:`layerlock.verifier.clock`): every pass records the time; a clock set back
  beyond ``clock_tolerance`` stops offline use — cached tokens are refused, served models renew
  at once and are dropped (``clock_rollback``) if the server cannot answer — until an online
  activation succeeds.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.errors import (
    DEFINITIVE,
    ActivationDenied,
    ConfigError,
    LayerlockError,
    RetryLater,
    TokenError,
    Unavailable,
)
from layerlock.shared.machine import machine_code
from layerlock.shared.tokens import LicenseClaims, extend_pinned, jwks
from layerlock.verifier.clock import ClockGuard
from layerlock.verifier.config import Config, ModelConfig
from layerlock.verifier.errors import ModelUnavailable
from layerlock.verifier.log import log
from layerlock.verifier.memory import SealedModel
from layerlock.verifier.state import MachineKeys, StateDir
from layerlock.verifier.unlock import accept_token, restore_model

LOCKED, UNLOCKED, REFUSED = "locked", "unlocked", "refused"
JWKS_REFRESH_S = 60.0


class Activator(Protocol):
    """What the daemon needs of the license server (:class:`layerlock.verifier.activation.ServerClient`)."""

    def activate(self, machine: str, model_id: str, keys: MachineKeys) -> str: ...

    def fetch_jwks(self) -> dict[str, Any]: ...


Restorer = Callable[..., SealedModel]  # (model id, locked, bundle, data key[, param=ncnn .param])


@dataclass
class Slot:
    """One configured model and what the daemon currently knows about it."""

    config: ModelConfig
    state: str = LOCKED
    reason: str = "activating"
    message: str = "activation in progress"
    model: SealedModel | None = None
    license: str | None = None
    expires_at: int | None = None
    renew_at: float = 0.0
    source: str | None = None
    jti: str | None = None  # the token in use (a newer one in the cache replaces it offline)
    failures: int = 0
    settled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.config.id, "state": self.state}
        if self.state != UNLOCKED:
            out.update(reason=self.reason, message=self.message)
        if self.model is not None:
            out.update(format=self.model.format, size=self.model.size, source=self.source,
                       license=self.license)
        out.update(expires_at=self.expires_at, renew_at=int(self.renew_at) if self.renew_at else None)
        return out


def retry_delay(failures: int, retry_min: float, retry_max: float, *, retry_after: float | None = None,
                until_expiry: float | None = None, rand: Callable[[], float] = random.random) -> float:
    """Seconds until the next attempt after ``failures`` failures in a row (>= 1).

    Why this shape: after an outage every sidecar of a fleet fails at about the same moment, and
    identical schedules would bring them back in one wave, again and again.  So:

    * exponential from ``retry_min``, doubling per failure, capped at ``retry_max``, with "equal
      jitter" (a uniform draw in [half, all] of it): waves spread and thin out as they repeat;
    * never sooner than the server's ``Retry-After`` (it is shedding load, or failing over), drawn
      uniformly in [Retry-After, 2 × Retry-After] so a shed crowd does not return as one crowd;
    * never later than ``retry_max``, nor — while a model is served from a token expiring in
      ``until_expiry`` seconds — than half of that (but at least ``retry_min``), so a few tries
      remain before it expires, whatever the server asked.
    """
    cap = retry_max if until_expiry is None else max(retry_min, min(retry_max, until_expiry / 2))
    delay = min(cap, retry_min * 2.0 ** min(max(failures, 1) - 1, 60)) * (0.5 + rand() / 2)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(cap, retry_after * (1 + rand())))
    return delay


def resolve_machine(config: Config, state: StateDir) -> str:
    """This host's machine code; it must be the one the state directory was enrolled as."""
    record = state.load_machine()
    source = config.machine_id_file or record.get("machine_id_file")
    code = machine_code(machine_id_path=source) if source else machine_code()
    if code != record["machine"]:
        raise ConfigError(f"this host's machine code {code} is not the enrolled {record['machine']} "
                          f"(state dir {state.path} copied from another host, or the machine id changed)")
    return code


class Daemon:
    def __init__(self, config: Config, state: StateDir, server: Activator, *,
                 restorer: Restorer = restore_model, clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.server = server
        self.restorer = restorer
        self.clock = clock
        self.on_change = on_change or (lambda: None)
        state.check()
        self.keys = state.load_keys()
        self.clock_guard = ClockGuard(state.clock_file, self.keys.sign, tolerance=config.clock_tolerance)
        self.clock_guard.load(clock(), state.file_times())
        self.jwks = state.load_jwks()
        self._jwks_lock = threading.Lock()
        self._jwks_fetched: float | None = None
        self.machine = resolve_machine(config, state)
        self.slots = {m.id: Slot(m) for m in config.models}
        self.stopping = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        for slot in self.slots.values():
            thread = threading.Thread(target=self._loop, args=(slot,), name=f"model:{slot.config.id}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_settled(self, timeout: float | None = None) -> bool:
        """True once every model is unlocked or definitively refused (its first attempt is over)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self.slots.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not slot.settled.wait(left):
                return False
        return True

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self.stopping.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        for slot in self.slots.values():
            with slot.lock:
                if slot.model is not None:
                    slot.model.drop()
                    slot.model = None

    def summary(self) -> str:
        unlocked = sum(1 for s in self.slots.values() if s.state == UNLOCKED)
        return f"{unlocked}/{len(self.slots)} models unlocked"

    # --- the per-model loop --------------------------------------------------------------------
    def _loop(self, slot: Slot) -> None:
        while not self.stopping.is_set():
            now = self.clock()
            self._watch_clock(now)
            self._expire(slot, now)
            if now >= slot.renew_at:
                try:
                    self._attempt(slot)
                except Exception as exc:  # noqa: BLE001 - a bug must not kill the model's loop
                    log("attempt_failed", level="error", model=slot.config.id, error=type(exc).__name__,
                        detail=str(exc)[:200])
                    self._backoff(slot)
                slot.settled.set()
                self.on_change()
                continue
            wake = slot.renew_at
            if slot.state == UNLOCKED and slot.expires_at is not None:
                wake = min(wake, slot.expires_at)
            with self._wake:
                if self.stopping.is_set():  # stop() notified before we got here: do not sleep through it
                    break
                self._wake.wait(timeout=max(0.05, min(wake - now, 60.0)))

    def _watch_clock(self, now: float) -> None:
        """Record the time; on a fresh rollback, make every served model renew online now."""
        reason, newly = self.clock_guard.check(now)
        if not newly:
            return
        log("clock_rollback", level="error", audit=True, detail=reason)
        for slot in self.slots.values():
            if slot.state == UNLOCKED:
                slot.renew_at = 0.0  # only an online answer may keep it served now
        with self._wake:
            self._wake.notify_all()

    def _offline_refused(self, slot: Slot) -> None:
        """The clock was set back and the server cannot vouch: no offline use."""
        reason = self.clock_guard.rolled_back
        if slot.state == UNLOCKED:
            self._drop(slot, "clock_rollback", reason, forget=False)
        elif slot.reason != "clock_rollback":
            self._set(slot, REFUSED, "clock_rollback", reason)

    def _expire(self, slot: Slot, now: float) -> None:
        if slot.state == UNLOCKED and slot.expires_at is not None and now >= slot.expires_at:
            self._drop(slot, "token_expired",
                       "the token expired before it could be renewed (license server unreachable "
                       "for longer than the offline grace)", forget=True)

    def _backoff(self, slot: Slot, retry_after: float | None = None) -> None:
        slot.failures += 1
        now = self.clock()
        # Never sleep through the rest of the offline grace: keep a few tries before expiry.
        left = slot.expires_at - now if slot.state == UNLOCKED and slot.expires_at is not None else None
        slot.renew_at = now + retry_delay(slot.failures, self.config.retry_min, self.config.retry_max,
                                          retry_after=retry_after, until_expiry=left)

    def _attempt(self, slot: Slot) -> None:
        model_id = slot.config.id
        try:
            token = self.server.activate(self.machine, model_id, self.keys)
        except Unavailable as exc:
            log("server_unreachable", level="warning", model=model_id, detail=exc.message)
            if self.clock_guard.rolled_back:
                self._offline_refused(slot)
            elif slot.state != UNLOCKED:
                self._from_cache(slot, exc.message)
            else:
                self._refresh_from_cache(slot)
            self._backoff(slot, exc.retry_after if isinstance(exc, RetryLater) else None)
            return
        except ActivationDenied as exc:
            log("activation_denied", level="warning", model=model_id, reason=exc.code, detail=exc.message)
            if exc.code not in DEFINITIVE and self.clock_guard.rolled_back:
                self._offline_refused(slot)
            elif exc.code not in DEFINITIVE:
                if slot.state == UNLOCKED:
                    self._refresh_from_cache(slot)
                else:
                    self._from_cache(slot, f"the server answered {exc.code}")
                    if slot.state == LOCKED:  # no usable cached token: say what the server said
                        self._set(slot, LOCKED, exc.code, exc.message)
            else:
                self._drop(slot, exc.code, exc.message or f"the license server denied: {exc.code}",
                           forget=True)
            self._backoff(slot)
            return
        if self._use_token(slot, token, source="server"):
            self.state.save_token(model_id, token)

    def _from_cache(self, slot: Slot, why: str) -> None:
        if self.clock_guard.rolled_back:
            self._offline_refused(slot)
            return
        token = self.state.load_token(slot.config.id)
        if token is None:
            if slot.state != REFUSED:  # a refusal keeps its reason (revoked, token_expired) while offline
                self._set(slot, LOCKED, "server_unreachable",
                          f"license server unreachable and no cached token ({why})")
            return
        if not self._use_token(slot, token, source="cache") and not self.clock_guard.rolled_back:
            self.state.delete_token(slot.config.id)

    def _refresh_from_cache(self, slot: Slot) -> None:
        """Serving, the server out of reach: take a newer cached token (an air-gapped import)."""
        token = self.state.load_token(slot.config.id)
        if token is None:
            return
        try:
            jti = jwt.decode(token, options={"verify_signature": False}).get("jti")
        except jwt.PyJWTError:
            jti = None
        if jti == slot.jti:
            return
        if not self._use_token(slot, token, source="cache") and not self.clock_guard.rolled_back:
            self.state.delete_token(slot.config.id)

    def _use_token(self, slot: Slot, token: str, *, source: str) -> bool:
        model_id = slot.config.id
        try:
            pinned = self.jwks
            try:
                claims, data_key = self._accept(token, model_id, pinned)
            except TokenError:
                if source != "server" or not self._extend_jwks(token, pinned):
                    raise
                claims, data_key = self._accept(token, model_id, self.jwks)
            if source == "cache":  # its iat is server time: a clock now before it was set back
                self.clock_guard.observe(claims.iat)
                reason, newly = self.clock_guard.check(self.clock())
                if reason:
                    if newly:
                        log("clock_rollback", level="error", audit=True, detail=reason)
                    raise ModelUnavailable("clock_rollback", reason)
            elif self.clock_guard.rolled_back and self.clock_guard.resync(self.clock()):
                log("clock_resynced", level="warning", audit=True, model=model_id,
                    detail="an online activation succeeded: the current clock is the baseline again")
            if self.clock() >= claims.exp:
                raise ModelUnavailable("token_expired", "token has expired")
            model = slot.model
            fresh = model is None
            if model is None:
                started, cpu = time.monotonic(), time.process_time()
                extra = {"param": slot.config.param} if slot.config.param is not None else {}  # ncnn
                model = self.restorer(model_id, slot.config.locked, slot.config.bundle, data_key, **extra)
                log("model_unlocked", model=model_id, source=source, size=model.size,
                    ms=round((time.monotonic() - started) * 1000, 1),
                    cpu_ms=round((time.process_time() - cpu) * 1000, 1))
            del data_key
        except LayerlockError as exc:
            log("token_refused", level="warning", model=model_id, source=source, reason=exc.code,
                detail=exc.message)
            if slot.state != UNLOCKED:
                self._set(slot, REFUSED, exc.code, f"{source} token refused: {exc.message}")
            self._backoff(slot)
            return False
        with slot.lock:
            slot.model = model
            slot.state, slot.reason, slot.message = UNLOCKED, "", ""
            slot.license, slot.expires_at, slot.source = claims.lic, claims.exp, source
            slot.jti = claims.jti
            slot.failures = 0
            now = self.clock()
            slot.renew_at = claims.rna if claims.rna > now else now + max(1.0, (claims.exp - now) / 3)
            if source == "cache":
                # Offline: keep asking the server on the back-off schedule, not only at rna.
                self._backoff(slot)
        log("token_accepted", model=model_id, source=source, license=claims.lic, exp=claims.exp,
            rna=claims.rna)
        if fresh:
            self._pin_later(model)
        return True

    def _accept(self, token: str, model_id: str,
                pinned: Mapping[str, ed25519.Ed25519PublicKey]) -> tuple[LicenseClaims, bytes]:
        return accept_token(token, keys=pinned, kem=self.keys.kem, machine_code=self.machine,
                            model_id=model_id, issuer=self.config.issuer, leeway=self.config.leeway,
                            now=self.clock())

    def _extend_jwks(self, token: str, tried: Mapping[str, ed25519.Ed25519PublicKey]) -> bool:
        """True if the token's unknown kid is now pinned, through keys the server's JWKS shows
        endorsed by keys we already trust.  Only a fresh server token may trigger the (rate
        limited) fetch: a cached token was accepted once, so its key is pinned already."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return False
        if not isinstance(kid, str) or kid in tried:
            return False  # refused for another reason than an unknown key
        with self._jwks_lock:
            if kid in self.jwks:  # another model's thread got there first
                return True
            now = time.monotonic()
            if self._jwks_fetched is not None and now - self._jwks_fetched < JWKS_REFRESH_S:
                return False
            self._jwks_fetched = now
            try:
                extended = extend_pinned(self.jwks, self.server.fetch_jwks())
            except LayerlockError as exc:
                log("jwks_fetch_failed", level="warning", detail=exc.message)
                return False
            added = sorted(set(extended) - set(self.jwks))
            if added:
                self.state.save_jwks(jwks(list(extended.values())))
                self.jwks = extended
                log("jwks_extended", kids=added)
            return kid in self.jwks

    def _pin_later(self, model: SealedModel) -> None:
        """``mlock`` a freshly served model off the critical path (see :mod:`layerlock.verifier.memory`).

        Faulting every page into our mapping costs ~0.1 s/GiB; READY=1 and the first ``get``
        need not wait for it.  A drop meanwhile still zeroes the pages.
        """
        def pin() -> None:
            started = time.monotonic()
            pinned = model.pin()
            ms = round((time.monotonic() - started) * 1000, 1)
            if pinned or model.dropped:
                log("model_pinned", model=model.name, mlocked=pinned, ms=ms)
            else:
                log("model_pinned", level="warning", model=model.name, mlocked=False, ms=ms,
                    detail="mlock failed (RLIMIT_MEMLOCK too small?): its pages could be swapped out")

        threading.Thread(target=pin, name=f"pin:{model.name}", daemon=True).start()

    def _set(self, slot: Slot, state: str, reason: str, message: str) -> None:
        with slot.lock:
            slot.state, slot.reason, slot.message = state, reason, message

    def _drop(self, slot: Slot, reason: str, message: str, *, forget: bool) -> None:
        with slot.lock:
            model, slot.model = slot.model, None
            was = slot.state
            slot.state, slot.reason, slot.message = REFUSED, reason, message
            slot.expires_at = None
            slot.license = None
            slot.jti = None
        if model is not None:
            model.drop()
            log("model_dropped", level="warning", audit=True, model=slot.config.id, reason=reason, was=was)
        if forget:
            self.state.delete_token(slot.config.id)
        self.on_change()

    # --- what the socket server asks -----------------------------------------------------------
    def model(self, model_id: str) -> SealedModel:
        slot = self.slots.get(model_id)
        if slot is None:
            raise ModelUnavailable("unknown_model", f"model {model_id!r} is not configured on this sidecar")
        self._expire(slot, self.clock())
        with slot.lock:
            if slot.state != UNLOCKED or slot.model is None:
                raise ModelUnavailable(slot.reason or slot.state, slot.message or f"model is {slot.state}")
            return slot.model

    def list_models(self) -> list[dict[str, Any]]:
        return [{"model": s.config.id, "state": s.state,
                 **({"format": s.model.format, "size": s.model.size} if s.model else {})}
                for s in self.slots.values()]

    def status(self) -> dict[str, Any]:
        return {"machine": self.machine, "server": self.config.server_url, "clock": self.clock_guard.status(),
                "models": [s.describe() for s in self.slots.values()]}
