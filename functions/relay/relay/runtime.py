"""One execution environment's long-lived parts: clients, HTTP session, caches, thread pool; and the dispatch."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import cached_property
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any
from urllib.request import getproxies

import requests
from requests.adapters import HTTPAdapter

from relay.batch import BatchRunner
from relay.clock import Clock, Deadline, SystemClock
from relay.errors import CredentialsError
from relay.identity_state import IdentityState
from relay.integrations.aws_clients import build_clients
from relay.integrations.credentials import CredentialsStore
from relay.integrations.edge import MIN_ATTEMPT_S, EdgeClient
from relay.integrations.ims import ImsTokenProvider
from relay.integrations.queue import RetryQueue
from relay.integrations.store import HandlesStore
from relay.models import InboundEvent
from relay.observability import count, logger, write_metrics_now
from relay.process_event import Relay
from relay.settings import Settings

if TYPE_CHECKING:
    from relay.webhook import WebhookApp


WORKERS_PER_EDGE_SLOT = 2
MIN_WORKING_TIME_S = 1.0  # less than this left after SAFETY_MARGIN_MS at the start of an invocation: misconfigured
# After this long without an invocation the kept-alive Edge/IMS connections are dropped before the next one: a far end
# or a NAT that forgot them while the environment was frozen would make the first call fail (a reset, counted as Edge
# being unavailable, or a token request failed for a whole batch). Under load they are kept, as they should be.
IDLE_RECONNECT_S = 60.0
HOST_POOLS = 32  # hosts whose connections are kept (Edge regions have far fewer); a pool costs nothing until used


def new_http_session(pool_size: int) -> requests.Session:
    """One keep-alive connection pool for Edge and IMS, sized for the batch concurrency."""
    return configure_http_session(requests.Session(), pool_size)


def configure_http_session(session: requests.Session, pool_size: int) -> requests.Session:
    """The relay's settings for its Edge/IMS session (also for a subclass, such as the soak test's tracing one)."""
    # With trust_env on, requests scans os.environ for proxy variables and looks for ~/.netrc on every request: about
    # a sixth of the relay's CPU per event in the benchmark. Lambda sets no proxy; keep that handling only if one is.
    session.trust_env = bool(getproxies())
    # One session serves every identity: a cookie set in an answer about one person must never ride along with the
    # next person's event (Edge reads identities such as FPID from cookies). State travels in `meta.state` only.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    # `pool_connections` is how many hosts keep their pool: Edge's base host, IMS, and with a sub-domain hint template
    # (`https://{hint}.server.adobedc.net/...`) one host per region. At 4, a batch reaching 5 hosts evicted a pool on
    # nearly every call, and each call then paid a new TLS handshake.
    adapter = HTTPAdapter(pool_connections=HOST_POOLS, pool_maxsize=pool_size, max_retries=0, pool_block=True)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class Runtime:
    """Everything is built lazily, so a cold start imports and constructs only what the first event needs."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        clients: dict[str, Any] | None = None,
        session: requests.Session | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self._clients = clients
        self._session = session
        self._rng = rng
        self._webhook_lock = threading.Lock()  # the resolver keeps per-request state; Lambda runs one at a time
        # Wall-clock time the last invocation ended: the wall clock surely moves on while Lambda freezes the environment
        # (whether the monotonic clock does is not documented); a clock step only adds or saves one reconnect.
        self._last_done: float | None = None
        self._ahead: list[Future[Any]] = []  # a webhook's tasks started beside its claim (`_start_ahead`)

    @property
    def workers(self) -> int:
        """Threads for a batch's identity groups: twice the Edge calls allowed in flight, so that while
        `batch_concurrency` records wait on Edge, the next ones take their claims (a DynamoDB round trip that would
        otherwise hold an Edge slot idle) and the finished ones hand over their results."""
        return WORKERS_PER_EDGE_SLOT * self.settings.batch_concurrency

    @cached_property
    def clients(self) -> dict[str, Any]:
        return self._clients or build_clients(self.workers + 4)

    @cached_property
    def session(self) -> requests.Session:
        return self._session or new_http_session(self.settings.batch_concurrency)

    @cached_property
    def credentials(self) -> CredentialsStore:
        s = self.settings
        return CredentialsStore(
            self.clients["secretsmanager"],
            adobe_secret_id=s.adobe_secret_id,
            webhook_secret_id=s.webhook_secret_id,
            max_age=s.secrets_max_age_s,
            identity_key_secret_id=s.identity_key_secret_id,
        )

    def identity_key(self) -> bytes | None:
        """The HMAC key of identity ids, or None when the deployment names none (plain SHA-256). Raises
        CredentialsError while it cannot be read."""
        return self.credentials.identity_key() if self.settings.identity_key_secret_id else None

    @cached_property
    def tokens(self) -> ImsTokenProvider | None:
        if self.settings.edge_auth != "ims":
            return None
        return ImsTokenProvider(self.session, self.settings.ims_token_url, self.credentials, self.clock)

    @cached_property
    def store(self) -> HandlesStore:
        return HandlesStore(
            self.clients["dynamodb"],
            self.settings.handles_table,
            ttl_days=self.settings.result_ttl_days,
            clock=self.clock,
        )

    @cached_property
    def relay(self) -> Relay:
        # At most `batch_concurrency` Edge calls in flight, whatever the number of worker threads.
        slots = threading.BoundedSemaphore(self.settings.batch_concurrency)
        edge = EdgeClient(self.session, self.settings, self.tokens, self.clock, self._rng, slots=slots)
        return Relay(self.store, edge, self.clock)

    @cached_property
    def queue(self) -> RetryQueue:
        return RetryQueue(self.clients["sqs"], self.settings.retry_queue_url)

    @cached_property
    def executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="relay")

    @cached_property
    def webhook(self) -> WebhookApp:
        from relay.webhook import WebhookApp  # Event Handler and standardwebhooks: only when a webhook arrives

        return WebhookApp(
            self.settings,
            self.relay,
            lambda: self.credentials,
            lambda: self.queue,
            self.clock,
            identity_key=self.identity_key,
            ahead=self._start_ahead,
        )

    @cached_property
    def batch(self) -> BatchRunner:
        return BatchRunner(
            self.settings, self.relay, self.executor, lambda: self.queue, self.identity_key, warm=self._warm_token
        )

    def _warm_token(self, deadline: Deadline) -> None:
        """Fetch the IMS token (and read the Adobe secret) once a batch's records are read, when none is cached: on a
        cold start or a renewal, its round trips then overlap the batch's claims and state read instead of following
        them, and the batch's first Edge calls find it ready. A failure is left to those calls, which ask
        the provider again (it holds a failure back for a few seconds) and report it for their events."""
        tokens = self.tokens  # built with `relay`, before the batch runs
        # A token that would lapse before the invocation's deadline is renewed now, not by whichever Edge call finds it
        # lapsed near the end, when the secret read and the token request (seconds, at worst) may not fit.
        live_for = deadline.remaining()
        if tokens is None or tokens.has_live_token(for_s=live_for) or live_for < MIN_ATTEMPT_S:
            return
        try:
            tokens.get(deadline=deadline, live_for_s=live_for)
        except CredentialsError as exc:
            logger.debug("IMS token not fetched ahead of the batch's Edge calls", reason=str(exc))
        except Exception:
            # A defect: the Edge calls will meet it too, but nothing reads this task's result, so say it here.
            logger.exception("unexpected error fetching the IMS token ahead of the batch's Edge calls")
            count("UnexpectedErrors")

    def _start_ahead(self, inbound: InboundEvent, deadline: Deadline) -> Callable[[], IdentityState] | None:
        """A webhook's round trips that need not wait for its claim, started beside it: the IMS token when none is
        cached, and the identity's state (read before the claim, as a batch reads its states; its write is checked
        against the version read, so an earlier read is as safe). Returns what gives the state once the claim is taken.
        A repeat whose claim is refused has read its state for nothing: one strongly consistent read. The invocation
        ends only once they have (`_settle_ahead`): none is left to be frozen halfway, holding the token lock."""
        if deadline.remaining() < MIN_ATTEMPT_S:
            return None  # `Relay.process` leaves such an event untouched
        tokens = self.tokens
        if tokens is not None and not tokens.has_live_token(for_s=deadline.remaining()):
            self._ahead.append(self.executor.submit(self._warm_token, deadline))
        if not inbound.identity_id:
            return None
        state = self.executor.submit(self.store.get_state, inbound.identity_id, inbound.datastream_id)
        self._ahead.append(state)
        return state.result

    def _settle_ahead(self) -> None:
        """Wait for a webhook's tasks that are still running (only when the event did not need them: a repeat, or
        one busy elsewhere). Each is bounded: a DynamoDB read by its client's timeouts, the token by the deadline."""
        if self._ahead:
            wait(self._ahead)
            self._ahead.clear()

    def _drop_idle_connections(self) -> None:
        if self._last_done is None or "session" not in self.__dict__:
            return
        if self.clock.now() - self._last_done > IDLE_RECONNECT_S:
            for adapter in self.session.adapters.values():
                adapter.close()  # empties the pools; the next request opens a new connection

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        # Powertools' `inject_lambda_context` and `log_metrics(capture_cold_start_metric=True)` would do what the
        # next lines and the `finally` do, with more: five context keys on every line (a batch's lines are few, but a
        # webhook's are most of its log volume) and a cold-start metric in an EMF document of its own, dimensioned by
        # function name, which the stack's alarms and dashboard (dimension `service`) would not read.
        self._drop_idle_connections()
        # Every line of this invocation names it, so the runbook's log lines join Lambda's START/REPORT lines.
        logger.append_keys(function_request_id=getattr(context, "aws_request_id", None))
        if self._last_done is None:
            # This environment's first event: its clients, secrets, identity key and token are built or read now.
            count("ColdStarts")
            allowed = self.settings.allowed_datastream_ids
            if allowed and self.settings.datastream_id not in allowed:
                # Allowed (it makes every event name its datastream), but easily done by mistake: said once per
                # environment, as each such event is refused for good (stored rejected; once the list is fixed,
                # `relayctl replay --to-datastream` sends them on).
                logger.warning(
                    "DATASTREAM_ID is not in ALLOWED_DATASTREAM_IDS: every event that names no datastream is refused; "
                    "list it there if such events should go to it",
                    datastreamId=self.settings.datastream_id,
                )
        remaining = context.get_remaining_time_in_millis() / 1000 if context is not None else 30.0
        if remaining - self.settings.safety_margin_s < MIN_WORKING_TIME_S:
            # Only a misconfiguration does this on a fresh invocation (a margin as long as the function's timeout):
            # every event would be retried until it reached the dead-letter queue, with nothing else to say why.
            logger.error(
                "SAFETY_MARGIN_MS leaves no time to relay anything; raise the function timeout or lower the margin",
                safetyMarginMs=round(self.settings.safety_margin_s * 1000),
                remainingMs=round(remaining * 1000),
            )
        try:
            records = event.get("Records") if isinstance(event, dict) else None
            if (
                isinstance(records, list)
                and records
                and isinstance(records[0], dict)
                and records[0].get("eventSource") == "aws:sqs"
            ):
                deadline = Deadline(self.clock, remaining - self.settings.safety_margin_s)
                return self.batch.run(event, deadline, lease_s=remaining + 5)
            context_of = event.get("requestContext") if isinstance(event, dict) else None
            if isinstance(context_of, dict) and isinstance(context_of.get("http"), dict):
                with self._webhook_lock:
                    try:
                        return self.webhook.handle(event, context)
                    finally:
                        self._settle_ahead()
            logger.error("unsupported event shape", keys=sorted(event)[:10] if isinstance(event, dict) else None)
            raise ValueError("unsupported event: expected an HTTP API 2.0 or SQS event")
        finally:
            self._last_done = self.clock.now()
            # One line in one write, as mid-batch (observability.write_metrics_now); nothing when a batch's metrics
            # were all written before its last write (Powertools' flush would warn of an empty set).
            write_metrics_now()
