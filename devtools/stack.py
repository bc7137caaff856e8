"""The whole local stack on loopback: Edge/IMS simulator, moto server, the template's resources.

``python -m devtools.stack --serve`` runs it with the real handler behind a local HTTP API gateway
and a background SQS poller until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from devtools.cfn_yaml import load_template
from devtools.edge_sim import EdgeSimulator, SimulatorClient
from devtools.gateway import Handler, LocalGateway
from devtools.moto_server import MotoServer
from devtools.poller import QueuePoller
from devtools.resources import (
    DEFAULT_REGION,
    DUMMY_CREDENTIALS,
    FUNCTION_RESOURCE,
    IDENTITY_KEY_RESOURCE,
    QUEUE_RESOURCE,
    TABLE_RESOURCE,
    LocalResources,
    TemplateResolver,
    aws_client,
    create_resources,
    resource,
    sqs_event,
)
from devtools.signing import curl_command, new_webhook_secret, sign_webhook

ROOT = Path(__file__).resolve().parent.parent
EVENTS_DIR = ROOT / "events"
DATASTREAM_ID = "ds-local"
ADOBE_SCOPES = "openid,AdobeID,additional_info.projectedProductContext"

# Variables that would point boto3 somewhere else than the emulator.
AWS_OVERRIDES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def decode_item(item: dict[str, Any]) -> dict[str, Any]:
    """A stored item as plain Python values, by the relay's own reader (one decoder for stored items). Imported when
    called: at this module's import it would load the relay's logger before `apply_env` gave it the stack's service
    name (`POWERTOOLS_SERVICE_NAME`), and the local stack's log lines would carry the default one."""
    from relay.integrations.store import decode_item as relay_decode_item

    return relay_decode_item(item)


class LocalStack:
    """Start the simulator and moto, create the template's resources, and hand out gateways and pollers.

    Parameters
    ----------
    template:
        The loaded SAM template (``template.yaml`` when omitted).
    failure_visibility_timeout:
        Passed to pollers: seconds before a failed record is visible again (None: the queue's own).
    sim_options:
        Extra keyword arguments for :class:`EdgeSimulator`.
    """

    def __init__(
        self,
        template: Mapping[str, Any] | None = None,
        *,
        region: str = DEFAULT_REGION,
        prefix: str = "local",
        failure_visibility_timeout: int | None = None,
        sim_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.template = load_template() if template is None else template
        self.region = region
        self.prefix = prefix
        self.failure_visibility_timeout = failure_visibility_timeout
        self.sim = EdgeSimulator(datastreams=(DATASTREAM_ID,), **dict(sim_options or {}))
        self.moto = MotoServer()
        self.webhook_secrets = [new_webhook_secret(), new_webhook_secret()]
        self.adobe_secret = {
            "clientId": self.sim.client_id,
            "clientSecret": self.sim.client_secret,
            "orgId": self.sim.org_id,
            "scopes": ADOBE_SCOPES,
        }
        self._resources: LocalResources | None = None
        self._gateways: list[LocalGateway] = []
        self._pollers: list[QueuePoller] = []
        self._saved_env: dict[str, str | None] | None = None
        self.sim_client: SimulatorClient | None = None
        self.sqs: Any = None
        self.dynamodb: Any = None
        self.secretsmanager: Any = None

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> LocalStack:
        try:
            self.sim.start()
            self.moto.start()
            self._resources = create_resources(
                self.moto.url,
                self.template,
                region=self.region,
                adobe_secret=self.adobe_secret,
                webhook_secret={"secrets": self.webhook_secrets},
                prefix=self.prefix,
            )
            self.sim_client = SimulatorClient(self.sim.url)
            self.sqs = aws_client("sqs", self.moto.url, self.region)
            self.dynamodb = aws_client("dynamodb", self.moto.url, self.region)
            self.secretsmanager = aws_client("secretsmanager", self.moto.url, self.region)
        except BaseException:
            self.stop()
            raise
        return self

    def stop_triggers(self) -> None:
        """Stop every gateway and poller handed out so far (the servers keep running)."""
        errors: list[BaseException] = []
        for stopper in [*(p.stop for p in self._pollers), *(g.stop for g in self._gateways)]:
            try:
                stopper()
            except Exception as err:  # keep stopping the rest
                errors.append(err)
        self._pollers.clear()
        self._gateways.clear()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Stop every gateway, poller and server this stack started, and restore the environment.

        Every step runs even when one before it fails or is interrupted (a test's timeout arrives as an exception in
        whatever step is running): the environment first, since a stack stopped halfway must never leave later tests
        talking to its dead servers. Once all have run, the last error is raised, with any earlier one as its context.
        """
        with contextlib.ExitStack() as steps:  # callbacks run last-in first-out, each whatever the others raise
            steps.callback(self.sim.stop)
            steps.callback(self.moto.stop)
            steps.callback(self._close_sim_client)
            steps.callback(self.stop_triggers)
            steps.callback(self.restore_env)

    def _close_sim_client(self) -> None:
        client, self.sim_client = self.sim_client, None
        if client is not None:
            client.close()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ accessors

    @property
    def resources(self) -> LocalResources:
        if self._resources is None:
            raise RuntimeError("stack not started")
        return self._resources

    @property
    def webhook_secret(self) -> str:
        """The first (current) webhook signing secret."""
        return self.webhook_secrets[0]

    @property
    def env(self) -> dict[str, str]:
        """Every environment variable the function needs, pointing at the loopback servers.

        The function's variables come from the template (Globals and RelayFunction), with its
        parameters set for the local stack and ``!Ref`` resolved to the local resources.
        """
        res = self.resources
        # `!Ref` of a secret is its ARN
        identity_key = {IDENTITY_KEY_RESOURCE: res.identity_key_secret_id} if res.identity_key_secret_id else {}
        resolver = TemplateResolver(
            self.template,
            region=self.region,
            names={TABLE_RESOURCE: res.table_name, QUEUE_RESOURCE: res.queue_url, **identity_key},
            arns={QUEUE_RESOURCE: res.queue_arn},
            parameters={
                "DatastreamId": DATASTREAM_ID,
                "AdobeSecretArn": res.adobe_secret_id,
                "WebhookSecretArn": res.webhook_secret_id,
                "EdgeBaseUrl": self.sim.url,
                "ImsTokenUrl": self.sim.ims_url,
                "EdgeAuth": "ims",
            },
        )
        variables: dict[str, Any] = {}
        glob = (self.template.get("Globals") or {}).get("Function") or {}
        own = resource(self.template, FUNCTION_RESOURCE).get("Properties") or {}
        for source in (glob, own):
            variables.update(((source.get("Environment") or {}).get("Variables")) or {})
        env = {k: str(v) for k, v in resolver.resolve(variables).items() if v is not None}
        env.update(
            {
                "AWS_ENDPOINT_URL": self.moto.url,
                "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region,
                "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIALS["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIALS["aws_secret_access_key"],
                "AWS_LAMBDA_FUNCTION_NAME": "interact-relay-local",
                "POWERTOOLS_TRACE_DISABLED": "true",
            }
        )
        env.setdefault("POWERTOOLS_SERVICE_NAME", "interact-relay")
        env.setdefault("POWERTOOLS_METRICS_NAMESPACE", "InteractRelay")
        env.setdefault("POWERTOOLS_LOG_LEVEL", "INFO")
        return env

    def apply_env(self, monkeypatch: Any = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """Set :attr:`env` (plus ``overrides``) in ``os.environ``.

        Through ``monkeypatch`` when given; otherwise the previous values come back on :meth:`stop`.
        """
        env = {**self.env, **(overrides or {})}
        removed = [k for k in os.environ if k in AWS_OVERRIDES or k.startswith("AWS_ENDPOINT_URL_")]
        if monkeypatch is not None:
            for key in removed:
                monkeypatch.delenv(key, raising=False)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            return env
        if self._saved_env is None:
            self._saved_env = {k: os.environ.get(k) for k in [*env, *removed]}
        for key in removed:
            os.environ.pop(key, None)
        os.environ.update(env)
        return env

    def restore_env(self) -> None:
        saved, self._saved_env = self._saved_env, None
        for key, value in (saved or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # ------------------------------------------------------------------------------------ triggers

    def gateway(self, handler: Handler, **options: Any) -> LocalGateway:
        """A started :class:`LocalGateway` for ``handler`` (stopped with the stack)."""
        options.setdefault("function_timeout_s", self.resources.function_timeout)
        gw = LocalGateway(handler, self.template, **options).start()
        self._gateways.append(gw)
        return gw

    def poller(self, handler: Handler, **options: Any) -> QueuePoller:
        """A :class:`QueuePoller` on the events queue, configured from the template (not started)."""
        res = self.resources
        types = sqs_event(self.template).get("FunctionResponseTypes") or []
        opts: dict[str, Any] = {
            "batch_size": res.batch_size,
            "batching_window": res.batching_window,
            "function_timeout": res.function_timeout,
            "region": self.region,
            "failure_visibility_timeout": self.failure_visibility_timeout,
            "report_batch_item_failures": "ReportBatchItemFailures" in types,
        }
        opts.update(options)
        poller = QueuePoller(handler, self.sqs, res.queue_url, res.queue_arn, **opts)
        self._pollers.append(poller)
        return poller

    # ------------------------------------------------------------------------------------ helpers

    def sign(self, body: bytes | str, *, msg_id: str | None = None, secret: str | None = None) -> dict[str, str]:
        """Standard Webhooks headers for ``body``, signed with the stack's current secret."""
        return sign_webhook(body, secret or self.webhook_secret, msg_id=msg_id)

    def reset(self, *, full_simulator: bool = False) -> None:
        """Between tests: clear simulator faults and records, empty the table and both queues."""
        self.sim.reset(full=full_simulator)
        self.clear_table()
        for url in (self.resources.queue_url, self.resources.dlq_url):
            self.sqs.purge_queue(QueueUrl=url)

    def clear_table(self) -> None:
        table = self.resources.table_name
        paginator = self.dynamodb.get_paginator("scan")
        for page in paginator.paginate(TableName=table, ProjectionExpression="pk, sk"):
            items = page.get("Items") or []
            for i in range(0, len(items), 25):
                requests = [{"DeleteRequest": {"Key": item}} for item in items[i : i + 25]]
                self.dynamodb.batch_write_item(RequestItems={table: requests})

    @cached_property
    def identity_key(self) -> bytes | None:
        """The identity key the template generated (the function's HMAC key of identity ids), read back once: it is
        created with the stack's resources and never changes."""
        arn = self.resources.identity_key_secret_id
        if not arn:
            return None
        value = self.secretsmanager.get_secret_value(SecretId=arn)["SecretString"]
        return str(json.loads(value)["key"]).encode("utf-8")

    def identity_id(self, namespace: str, identity: str) -> str:
        """The opaque id under which the function keeps this identity's state (`IDENTITY#<id>`)."""
        from relay.identity_state import opaque_identity_id

        return opaque_identity_id(namespace, identity, key=self.identity_key)

    def result_item(self, event_id: str) -> dict[str, Any] | None:
        """The ``EVENT#<eventId>``/``RESULT`` item as plain Python values (``handle``/``errors``/... decoded)."""
        resp = self.dynamodb.get_item(
            TableName=self.resources.table_name,
            Key={"pk": {"S": f"EVENT#{event_id}"}, "sk": {"S": "RESULT"}},
            ConsistentRead=True,
        )
        item = resp.get("Item")
        return decode_item(item) if item else None

    def filed_under(self, event_id: str) -> list[str]:
        """The eventIds of the result items under ``event_id``: its own, and any the relay filed beside it
        (``<eventId>#reused-...``, ``<eventId>#invalid-...``), sorted."""
        items = self.dynamodb.scan(
            TableName=self.resources.table_name,
            FilterExpression="begins_with(pk, :event)",
            ExpressionAttributeValues={":event": {"S": f"EVENT#{event_id}"}},
        )["Items"]
        return sorted(item["pk"]["S"].removeprefix("EVENT#") for item in items)

    def result(self, event_id: str) -> dict[str, Any]:
        """Like ``result_item``, for an event that must have a stored result."""
        item = self.result_item(event_id)
        if item is None:
            raise AssertionError(f"no result stored for {event_id}")
        return item


# ---------------------------------------------------------------------------------------- decoding


# ---------------------------------------------------------------------------------------- --serve


def serve(stack: LocalStack) -> None:
    env = stack.apply_env()
    from relay.handler import lambda_handler  # imported after the environment is set

    gateway = stack.gateway(lambda_handler)
    stack.poller(lambda_handler).start()
    sample = json.loads((EVENTS_DIR / "webhook-order.json").read_text(encoding="utf-8"))
    body: str = sample["body"]
    print("# environment of the function")
    for key, value in sorted(env.items()):
        print(f"export {key}={shlex.quote(value)}")
    print()
    print()
    print("# relayctl against this stack (in another shell, after the exports above; no --stack):")
    print(f"export QUEUE_URL={shlex.quote(stack.resources.queue_url)}")
    print(f"export DLQ_URL={shlex.quote(stack.resources.dlq_url)}")
    print(".venv/bin/relayctl show <eventId>    # the event's xdm._id; rejected, replay, redrive likewise")
    print()
    print(f"gateway:   {gateway.url}/events")
    print(f"queue:     {stack.resources.queue_url}")
    print(f"simulator: {stack.sim.url}")
    print()
    print('# make Edge fail for one event (README, "Trying failures locally"): 503 to every attempt at order-1')
    print(f'curl -sS -X POST {stack.sim.url}/_sim/faults -d \'{{"status": 503, "match_id": "order-1"}}\'')
    print()
    print("# a signed request (signatures expire after 5 minutes):")
    print(curl_command(f"{gateway.url}/events", body, stack.sign(body)))
    print()
    print("# an event file through the handler, as `sam local invoke -e` would (in a shell with the exports above):")
    print("make invoke EVENT=events/webhook-order.json")
    print()
    print("# re-sign later with:")
    resign = (
        "from devtools.signing import sign_webhook; import json, sys; "
        "b = json.load(open('events/webhook-order.json'))['body']; "
        f"print(json.dumps(sign_webhook(b, {stack.webhook_secret!r})))"
    )
    print(f".venv/bin/python -c {shlex.quote(resign)}")
    print()
    print("serving; press Ctrl-C to stop", flush=True)
    threading.Event().wait()


def stop_on_sigterm() -> None:
    """Turn SIGTERM (and SIGINT, even when inherited as ignored) into KeyboardInterrupt so servers get stopped."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="run the stack with the real handler until Ctrl-C")
    parser.add_argument(
        "--retry-seconds",
        type=int,
        default=None,
        help="a record handed back comes again after this many seconds, not the queue's visibility timeout (180): "
        "to see an event reach the dead-letter queue (5 receives) in a minute rather than 15",
    )
    args = parser.parse_args(argv)
    if not args.serve:
        parser.print_help()
        return 2
    sys.path.insert(0, str(ROOT / "functions" / "relay"))
    stop_on_sigterm()
    try:
        with LocalStack(failure_visibility_timeout=args.retry_seconds) as stack:
            serve(stack)
    except KeyboardInterrupt:
        print("\nstopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
