"""Create the template's table, queues and secrets in a local AWS emulator (moto server).

Every value the template defines (key schema, TTL attribute, visibility timeout, redrive policy,
function timeout, batch size, batching window) is read from ``template.yaml``; only AWS's own
defaults fill what the template leaves out.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from devtools.cfn_yaml import load_template

DEFAULT_REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}

TABLE_RESOURCE = "HandlesTable"
QUEUE_RESOURCE = "EventsQueue"
IDENTITY_KEY_RESOURCE = "IdentityKeySecret"
DLQ_RESOURCE = "EventsDeadLetterQueue"
FUNCTION_RESOURCE = "RelayFunction"

# AWS defaults, used only where the template is silent.
SAM_DEFAULT_FUNCTION_TIMEOUT = 3
SQS_DEFAULT_BATCH_SIZE = 10
SQS_DEFAULT_BATCHING_WINDOW = 0
SQS_DEFAULT_VISIBILITY_TIMEOUT = 30


@dataclass(frozen=True)
class LocalResources:
    table_name: str
    queue_url: str
    queue_arn: str
    dlq_url: str
    dlq_arn: str
    adobe_secret_id: str
    webhook_secret_id: str
    function_timeout: int
    batch_size: int
    batching_window: int
    max_receive_count: int | None
    visibility_timeout: int
    region: str = DEFAULT_REGION
    endpoint_url: str = ""
    identity_key_secret_id: str | None = None  # the template's generated identity key, when it has one


def aws_client(service: str, endpoint_url: str, region: str = DEFAULT_REGION) -> Any:
    """A boto3 client for ``service`` at ``endpoint_url`` with dummy credentials and short timeouts."""
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client(service, endpoint_url=endpoint_url, region_name=region, config=config, **DUMMY_CREDENTIALS)


# --------------------------------------------------------------------------------------------- template


class TemplateResolver:
    """Resolves the intrinsic functions a local stack needs (Ref, GetAtt, Sub, If, Join, Select, ...).

    Parameters take their ``Default``; ``names`` maps logical ids to physical names and ``arns`` to ARNs.
    """

    def __init__(
        self,
        template: Mapping[str, Any],
        *,
        region: str = DEFAULT_REGION,
        names: Mapping[str, str] | None = None,
        arns: Mapping[str, str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self.template = template
        self.region = region
        self.names = dict(names or {})
        self.arns = dict(arns or {})
        self.parameters = {
            name: spec.get("Default") for name, spec in (template.get("Parameters") or {}).items() if spec
        }
        self.parameters.update(parameters or {})

    def _ref(self, name: str) -> Any:
        pseudo = {
            "AWS::Region": self.region,
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::StackName": "interact-relay-local",
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::NoValue": None,
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.names:
            return self.names[name]
        raise KeyError(f"cannot resolve Ref {name}")

    def condition(self, name: str) -> bool:
        conditions = self.template.get("Conditions") or {}
        return bool(self.resolve(conditions[name]))

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::GetAtt":
                logical, attr = arg if isinstance(arg, list) else str(arg).split(".", 1)
                if attr == "Arn" and logical in self.arns:
                    return self.arns[logical]
                if attr == "QueueName" and logical in self.names:
                    return self.names[logical]
                raise KeyError(f"cannot resolve GetAtt {logical}.{attr}")
            if key == "Fn::If":
                cond, yes, no = arg
                return self.resolve(yes if self.condition(cond) else no)
            if key == "Fn::Equals":
                left, right = self.resolve(arg)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::And":
                return all(self.resolve(a) for a in arg)
            if key == "Fn::Or":
                return any(self.resolve(a) for a in arg)
            if key == "Fn::Join":
                sep, items = arg
                return sep.join(str(i) for i in self.resolve(items))
            if key == "Fn::Select":
                index, items = arg
                return self.resolve(items)[int(self.resolve(index))]
            if key == "Fn::Sub":
                return self._sub(arg)
        return {k: self.resolve(v) for k, v in value.items()}

    def _sub(self, arg: Any) -> str:
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name:
                logical, attr = name.split(".", 1)
                return str(self.resolve({"Fn::GetAtt": [logical, attr]}))
            return str(self._ref(name))

        return re.sub(r"\$\{([^}]+)\}", repl, text)


def resource(template: Mapping[str, Any], logical_id: str) -> dict[str, Any]:
    resources = template.get("Resources") or {}
    if logical_id not in resources:
        raise KeyError(f"template has no resource {logical_id}")
    res: dict[str, Any] = resources[logical_id]
    return res


def resource_properties(template: Mapping[str, Any], logical_id: str, resolver: TemplateResolver) -> dict[str, Any]:
    props = resolver.resolve(resource(template, logical_id).get("Properties") or {})
    return {k: v for k, v in props.items() if v is not None}


def function_events(template: Mapping[str, Any], function: str = FUNCTION_RESOURCE) -> dict[str, dict[str, Any]]:
    """The ``Events`` of a serverless function, by name."""
    events: dict[str, dict[str, Any]] = (resource(template, function).get("Properties") or {}).get("Events") or {}
    return events


def sqs_event(template: Mapping[str, Any], function: str = FUNCTION_RESOURCE) -> dict[str, Any]:
    """The properties of the function's (single) SQS event source."""
    for event in function_events(template, function).values():
        if event.get("Type") == "SQS":
            props: dict[str, Any] = event.get("Properties") or {}
            return props
    raise KeyError(f"{function} has no SQS event")


def http_routes(template: Mapping[str, Any], function: str = FUNCTION_RESOURCE) -> set[tuple[str, str]]:
    """The ``(METHOD, path)`` routes the function's HttpApi events declare (``("ANY", "$default")`` if bare)."""
    routes: set[tuple[str, str]] = set()
    for event in function_events(template, function).values():
        if event.get("Type") != "HttpApi":
            continue
        props = event.get("Properties") or {}
        if "Path" not in props and "Method" not in props:
            routes.add(("ANY", "$default"))
        else:
            routes.add((str(props.get("Method", "ANY")).upper(), str(props.get("Path", "$default"))))
    return routes


def function_property(template: Mapping[str, Any], name: str, function: str = FUNCTION_RESOURCE) -> Any:
    """A property of the function as SAM deploys it: its own, else the template's `Globals.Function` one (resolved)."""
    own = (resource(template, function).get("Properties") or {}).get(name)
    glob = ((template.get("Globals") or {}).get("Function") or {}).get(name)
    return TemplateResolver(template).resolve(own if own is not None else glob)


def function_timeout(template: Mapping[str, Any], function: str = FUNCTION_RESOURCE) -> int:
    value = function_property(template, "Timeout", function)
    return int(value) if value is not None else SAM_DEFAULT_FUNCTION_TIMEOUT


# --------------------------------------------------------------------------------------------- creation


def _create_table(ddb: Any, name: str, props: Mapping[str, Any]) -> None:
    kwargs: dict[str, Any] = {
        "TableName": name,
        "AttributeDefinitions": props["AttributeDefinitions"],
        "KeySchema": props["KeySchema"],
        "BillingMode": props.get("BillingMode", "PROVISIONED"),
    }
    if "ProvisionedThroughput" in props:
        kwargs["ProvisionedThroughput"] = {k: int(v) for k, v in props["ProvisionedThroughput"].items()}
    for key in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        if key in props:
            kwargs[key] = props[key]
    if "SSESpecification" in props:
        kwargs["SSESpecification"] = {"Enabled": _attr_str(props["SSESpecification"].get("SSEEnabled")) == "true"}
    if "StreamSpecification" in props:
        kwargs["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
    try:
        ddb.create_table(**kwargs)
    except ClientError as err:
        if err.response["Error"]["Code"] != "ResourceInUseException":
            raise
    ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})
    pitr = props.get("PointInTimeRecoverySpecification") or {}
    if _attr_str(pitr.get("PointInTimeRecoveryEnabled")) == "true":
        ddb.update_continuous_backups(
            TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
        )
    ttl = props.get("TimeToLiveSpecification")
    if ttl and str(ttl.get("Enabled", False)).lower() == "true":
        ddb.update_time_to_live(
            TableName=name, TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True}
        )


def create_handles_table(
    ddb: Any, name: str, template: Mapping[str, Any] | None = None, *, region: str = DEFAULT_REGION
) -> None:
    """The results table exactly as template.yaml declares it, through `ddb` (also an in-process moto client)."""
    tpl = load_template() if template is None else template
    resolver = TemplateResolver(tpl, region=region, names={TABLE_RESOURCE: name})
    _create_table(ddb, name, resource_properties(tpl, TABLE_RESOURCE, resolver))


_QUEUE_ATTRS = (
    "VisibilityTimeout",
    "MessageRetentionPeriod",
    "DelaySeconds",
    "MaximumMessageSize",
    "ReceiveMessageWaitTimeSeconds",
    "FifoQueue",
    "ContentBasedDeduplication",
    "SqsManagedSseEnabled",
)


def _create_queue(sqs: Any, name: str, props: Mapping[str, Any], redrive: Mapping[str, Any] | None) -> tuple[str, str]:
    attrs = {k: _attr_str(props[k]) for k in _QUEUE_ATTRS if k in props}
    if attrs.get("FifoQueue") == "true" and not name.endswith(".fifo"):
        name += ".fifo"
    if redrive:
        attrs["RedrivePolicy"] = json.dumps(
            {"deadLetterTargetArn": redrive["deadLetterTargetArn"], "maxReceiveCount": int(redrive["maxReceiveCount"])}
        )
    url: str = sqs.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]
    arn: str = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def _attr_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _put_secret(sm: Any, name: str, value: Mapping[str, Any]) -> str:
    body = json.dumps(value)
    try:
        arn: str = sm.create_secret(Name=name, SecretString=body)["ARN"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "ResourceExistsException":
            raise
        arn = sm.put_secret_value(SecretId=name, SecretString=body)["ARN"]
    return arn


def _generated_secret(sm: Any, name: str, props: Mapping[str, Any]) -> str:
    """A secret made the way CloudFormation's `GenerateSecretString` makes it (a random string of letters and digits
    under `GenerateStringKey` in `SecretStringTemplate`); an existing one is kept, as a stack update keeps it."""
    spec = props.get("GenerateSecretString") or {}
    alphabet = string.ascii_letters + string.digits
    value = "".join(secrets.choice(alphabet) for _ in range(int(spec.get("PasswordLength", 32))))
    doc = json.loads(spec.get("SecretStringTemplate") or "{}")
    doc[spec.get("GenerateStringKey", "key")] = value
    try:
        arn: str = sm.create_secret(Name=name, SecretString=json.dumps(doc))["ARN"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "ResourceExistsException":
            raise
        arn = sm.describe_secret(SecretId=name)["ARN"]
    return arn


def create_resources(
    endpoint_url: str,
    template: Mapping[str, Any] | None = None,
    *,
    region: str = DEFAULT_REGION,
    adobe_secret: Mapping[str, Any],
    webhook_secret: Mapping[str, Any],
    prefix: str = "local",
) -> LocalResources:
    """Create the table, queues and secrets the function needs; idempotent against one emulator.

    Parameters
    ----------
    endpoint_url:
        The emulator's URL, e.g. ``http://127.0.0.1:5000``.
    template:
        The loaded SAM template; ``template.yaml`` when omitted.
    adobe_secret, webhook_secret:
        The secret values (stored as JSON strings).
    prefix:
        Physical names are ``<prefix>-handles``, ``<prefix>-events``, ``<prefix>-events-dlq``, ``<prefix>/...``.
    """
    tpl = load_template() if template is None else template
    ddb = aws_client("dynamodb", endpoint_url, region)
    sqs = aws_client("sqs", endpoint_url, region)
    sm = aws_client("secretsmanager", endpoint_url, region)

    table_name = f"{prefix}-handles"
    create_handles_table(ddb, table_name, tpl, region=region)
    resolver = TemplateResolver(tpl, region=region, names={TABLE_RESOURCE: table_name})

    dlq_props = resource_properties(tpl, DLQ_RESOURCE, resolver)
    dlq_url, dlq_arn = _create_queue(sqs, f"{prefix}-events-dlq", dlq_props, None)
    resolver.arns[DLQ_RESOURCE] = dlq_arn
    resolver.names[DLQ_RESOURCE] = dlq_url

    queue_props = resource_properties(tpl, QUEUE_RESOURCE, resolver)
    redrive = queue_props.get("RedrivePolicy")
    queue_url, queue_arn = _create_queue(sqs, f"{prefix}-events", queue_props, redrive)
    resolver.arns[QUEUE_RESOURCE] = queue_arn
    resolver.names[QUEUE_RESOURCE] = queue_url

    event = resolver.resolve(sqs_event(tpl))
    adobe_arn = _put_secret(sm, f"{prefix}/interact-relay/adobe", adobe_secret)
    webhook_arn = _put_secret(sm, f"{prefix}/interact-relay/webhook", webhook_secret)
    identity_key_arn = None
    if IDENTITY_KEY_RESOURCE in (tpl.get("Resources") or {}):
        key_props = resource_properties(tpl, IDENTITY_KEY_RESOURCE, resolver)
        identity_key_arn = _generated_secret(sm, f"{prefix}/interact-relay/identity-key", key_props)
    return LocalResources(
        table_name=table_name,
        queue_url=queue_url,
        queue_arn=queue_arn,
        dlq_url=dlq_url,
        dlq_arn=dlq_arn,
        adobe_secret_id=adobe_arn,
        webhook_secret_id=webhook_arn,
        function_timeout=function_timeout(tpl),
        batch_size=int(event.get("BatchSize") or SQS_DEFAULT_BATCH_SIZE),
        batching_window=int(event.get("MaximumBatchingWindowInSeconds") or SQS_DEFAULT_BATCHING_WINDOW),
        max_receive_count=int(redrive["maxReceiveCount"]) if redrive else None,
        visibility_timeout=int(queue_props.get("VisibilityTimeout", SQS_DEFAULT_VISIBILITY_TIMEOUT)),
        region=region,
        endpoint_url=endpoint_url,
        identity_key_secret_id=identity_key_arn,
    )
