"""Static checks of template.yaml: the contract's infrastructure rules (§1, §3, §8, §9) and least privilege."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay.errors import ConfigurationError
from relay.settings import load_settings

from devtools.cfn_yaml import load_template
from tests.unit.conftest import fresh_interpreter

ROOT = Path(__file__).resolve().parents[2]

FUNCTION = "RelayFunction"
QUEUE = "EventsQueue"
DLQ = "EventsDeadLetterQueue"
TABLE = "HandlesTable"

# §3 of the contract: every variable the function reads, and what it must be bound to.
CONTRACT_ENV = {
    "HANDLES_TABLE": {"Ref": TABLE},
    "DATASTREAM_ID": {"Ref": "DatastreamId"},
    "ADOBE_SECRET_ID": {"Fn::If": ["UsesIms", {"Ref": "AdobeSecretArn"}, {"Ref": "AWS::NoValue"}]},
    "WEBHOOK_SECRET_ID": {"Ref": "WebhookSecretArn"},
    "EDGE_BASE_URL": {"Ref": "EdgeBaseUrl"},
    "EDGE_AUTH": {"Ref": "EdgeAuth"},
    "IMS_TOKEN_URL": {"Ref": "ImsTokenUrl"},
    "WEBHOOK_AUTH": "standard-webhooks",  # the API has no other authorizer: `none` would open it to anyone
    "RETRY_QUEUE_URL": {"Ref": QUEUE},
    "RESULT_TTL_DAYS": {"Ref": "ResultTtlDays"},
}

# §3 defaults, as the template's parameter defaults.
CONTRACT_DEFAULTS = {
    "EdgeBaseUrl": "https://server.adobedc.net",
    "EdgeAuth": "ims",
    "ImsTokenUrl": "https://ims-na1.adobelogin.com/ims/token/v3",
    "ResultTtlDays": "30",
}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def resources(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in template["Resources"].items() if res["Type"] == type_}


def function_properties(template: dict[str, Any], name: str) -> dict[str, Any]:
    """The function's properties with Globals.Function applied the way SAM does (maps merge, scalars override)."""
    merged: dict[str, Any] = dict(template.get("Globals", {}).get("Function", {}))
    for key, value in template["Resources"][name]["Properties"].items():
        if key == "Environment":
            variables = {
                **merged.get("Environment", {}).get("Variables", {}),
                **value.get("Variables", {}),
            }
            merged["Environment"] = {"Variables": variables}
        else:
            merged[key] = value
    return merged


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def policy_statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every IAM statement anywhere in the template (SAM Policies, IAM roles/policies, resource policies)."""
    return [node for node in walk(template) if isinstance(node, dict) and "Effect" in node]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def literal_strings(value: Any) -> Iterator[str]:
    """The literal text of a Resource entry: plain strings, Fn::Sub templates and Fn::Join pieces."""
    for node in walk(value):
        if isinstance(node, str):
            yield node


def statements_granting(template: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in policy_statements(template) if action in as_list(s.get("Action", []))]


# --- queue semantics (§8) ---------------------------------------------------------------------------


def test_visibility_timeout_is_at_least_six_times_the_function_timeout(template: dict[str, Any]) -> None:
    timeout = function_properties(template, FUNCTION)["Timeout"]
    assert isinstance(timeout, int)
    visibility = template["Resources"][QUEUE]["Properties"]["VisibilityTimeout"]
    assert visibility >= 6 * timeout


def test_the_function_knows_the_queue_visibility_timeout(template: dict[str, Any]) -> None:
    # The relay keeps a record Edge asked to retry later than this invisible until then (relay/batch.py).
    variables = function_properties(template, FUNCTION)["Environment"]["Variables"]
    visibility = template["Resources"][QUEUE]["Properties"]["VisibilityTimeout"]
    assert int(variables["QUEUE_VISIBILITY_TIMEOUT_SECONDS"]) == int(visibility)


def test_queue_redrives_to_the_dead_letter_queue_after_five_receives(template: dict[str, Any]) -> None:
    redrive = template["Resources"][QUEUE]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": [DLQ, "Arn"]}
    assert redrive["maxReceiveCount"] == 5
    assert template["Resources"][DLQ]["Properties"]["MessageRetentionPeriod"] == 1209600


def test_queues_are_standard_and_encrypted(template: dict[str, Any]) -> None:
    queues = resources(template, "AWS::SQS::Queue")
    assert set(queues) >= {QUEUE, DLQ}
    for name, queue in queues.items():
        props = queue["Properties"]
        assert props.get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in props, name
        assert not props.get("FifoQueue", False), name


def test_the_queues_are_kept_on_stack_delete_as_the_table_is(template: dict[str, Any]) -> None:
    # GIVEN the two queues: they hold customer events (failed ones for up to 14 days in the dead-letter queue)
    table = template["Resources"][TABLE]
    for name in (QUEUE, DLQ):
        queue = template["Resources"][name]

        # THEN `sam delete` and a replacement leave them, like the table, but a failed first create does not
        assert (queue["DeletionPolicy"], queue["UpdateReplacePolicy"]) == (table["DeletionPolicy"], "Retain"), name
        assert queue["DeletionPolicy"] == "RetainExceptOnCreate", name
        # and their names are generated: a new stack of the same name creates new queues beside the kept ones
        assert "QueueName" not in queue["Properties"], name


def test_the_template_sets_no_queue_policy_so_one_set_for_producers_is_kept(template: dict[str, Any]) -> None:
    # A queue's policy is one document: a template-managed one (a TLS-only Deny, say) would replace, on the next
    # deploy, the one an operator set for producers (SNS, EventBridge, another account), and they would be refused.
    assert resources(template, "AWS::SQS::QueuePolicy") == {}


def test_sqs_event_reports_batch_item_failures(template: dict[str, Any]) -> None:
    events = template["Resources"][FUNCTION]["Properties"]["Events"]
    sqs = [e["Properties"] for e in events.values() if e["Type"] == "SQS"]
    assert len(sqs) == 1
    props = sqs[0]
    assert props["Queue"] == {"Fn::GetAtt": [QUEUE, "Arn"]}
    assert "ReportBatchItemFailures" in props.get("FunctionResponseTypes", [])
    # A standard queue only delivers batches above 10 with a batching window of at least 1 s.
    if props.get("BatchSize", 10) > 10:
        assert props.get("MaximumBatchingWindowInSeconds", 0) >= 1


def test_webhook_event_is_http_api_post_events(template: dict[str, Any]) -> None:
    events = template["Resources"][FUNCTION]["Properties"]["Events"]
    http = [e["Properties"] for e in events.values() if e["Type"] == "HttpApi"]
    assert http == [{"ApiId": {"Ref": "RelayHttpApi"}, "Path": "/events", "Method": "POST"}]
    api = template["Resources"]["RelayHttpApi"]
    assert api["Type"] == "AWS::Serverless::HttpApi"
    route = api["Properties"]["DefaultRouteSettings"]
    assert route["ThrottlingRateLimit"] == {"Ref": "ApiThrottlingRateLimit"}
    assert route["ThrottlingBurstLimit"] == {"Ref": "ApiThrottlingBurstLimit"}


# --- table (§9) ---------------------------------------------------------------------------------------


def test_table_key_schema_and_billing(template: dict[str, Any]) -> None:
    table = template["Resources"][TABLE]
    assert table["Type"] == "AWS::DynamoDB::Table"
    props = table["Properties"]
    assert props["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert sorted(props["AttributeDefinitions"], key=lambda a: a["AttributeName"]) == [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
    ]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert "GlobalSecondaryIndexes" not in props
    assert "LocalSecondaryIndexes" not in props


def test_table_ttl_pitr_encryption_and_retention(template: dict[str, Any]) -> None:
    table = template["Resources"][TABLE]
    props = table["Properties"]
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expiresAt", "Enabled": True}
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert props["SSESpecification"]["SSEEnabled"] is True
    assert table["DeletionPolicy"] == "RetainExceptOnCreate"  # kept with the stack, not after a failed first create
    assert table["UpdateReplacePolicy"] == "Retain"


def test_table_deletion_protection_is_a_parameter_off_by_default(template: dict[str, Any]) -> None:
    # GIVEN the parameter: off by default, as a first create that fails must be able to delete the table it made
    parameter = template["Parameters"]["TableDeletionProtection"]
    assert (parameter["Type"], parameter["Default"]) == ("String", "false")
    assert sorted(parameter["AllowedValues"]) == ["false", "true"]

    # THEN "true" turns the table's deletion protection on, through a condition; "false" leaves the property out, so
    # that a deploy of a stack whose protection an operator turned on by hand (as the README once said to) keeps it
    protection = template["Resources"][TABLE]["Properties"]["DeletionProtectionEnabled"]
    condition, when_true, when_false = protection["Fn::If"]
    assert template["Conditions"][condition] == {"Fn::Equals": [{"Ref": "TableDeletionProtection"}, "true"]}
    assert (when_true, when_false) == (True, {"Ref": "AWS::NoValue"})


# --- function (§1, §3) -------------------------------------------------------------------------------


def test_function_runtime_and_architecture(template: dict[str, Any]) -> None:
    functions = resources(template, "AWS::Serverless::Function")
    assert FUNCTION in functions
    for name in functions:
        props = function_properties(template, name)
        assert props["Runtime"] == "python3.13", name
        assert props["Architectures"] == ["arm64"], name
    props = function_properties(template, FUNCTION)
    assert props["Handler"] == "relay.handler.lambda_handler"
    assert props["CodeUri"].rstrip("/") == "functions/relay"
    assert props["Layers"] == [{"Ref": "DepsLayer"}]


def test_layer_is_built_for_the_runtime(template: dict[str, Any]) -> None:
    layer = template["Resources"]["DepsLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Metadata"]["BuildMethod"] == "python3.13"
    assert layer["Metadata"]["BuildArchitecture"] == "arm64"
    assert layer["Properties"]["ContentUri"].rstrip("/") == "layers/deps"
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.13"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]


def test_contract_environment_variables_are_set(template: dict[str, Any]) -> None:
    variables = function_properties(template, FUNCTION)["Environment"]["Variables"]
    for name, binding in CONTRACT_ENV.items():
        assert variables.get(name) == binding, name
    assert variables["POWERTOOLS_SERVICE_NAME"] == {"Ref": "AWS::StackName"}  # one metrics dimension per stack
    assert variables["POWERTOOLS_LOG_LEVEL"] == {"Ref": "LogLevel"}
    # Every Ref'd parameter exists.
    parameters = template["Parameters"]
    for binding in variables.values():
        if isinstance(binding, dict) and "Ref" in binding:
            ref = binding["Ref"]
            assert ref in parameters or ref in template["Resources"] or ref.startswith("AWS::"), binding


def test_parameter_defaults_match_the_contract(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    for name, default in CONTRACT_DEFAULTS.items():
        assert parameters[name]["Default"] == default, name
    assert "Default" not in parameters["DatastreamId"]
    assert set(parameters["EdgeAuth"]["AllowedValues"]) == {"ims", "none"}
    assert "WebhookAuth" not in parameters  # a deployed API is always signed (README, "Deploy")


def test_logs_have_a_retention(template: dict[str, Any]) -> None:
    props = function_properties(template, FUNCTION)
    group = props["LoggingConfig"]["LogGroup"]
    assert group["Ref"] in template["Resources"]
    for name, res in resources(template, "AWS::Logs::LogGroup").items():
        assert res["Properties"]["RetentionInDays"] == 30, name


def test_tracing_is_off_by_default(template: dict[str, Any]) -> None:
    parameter = template["Parameters"]["EnableTracing"]
    assert parameter["Default"] == "false"
    tracing = function_properties(template, FUNCTION).get("Tracing")
    assert isinstance(tracing, dict) and "Fn::If" in tracing, "tracing must follow the EnableTracing condition"
    condition, when_true, when_false = tracing["Fn::If"]
    assert template["Conditions"][condition] == {"Fn::Equals": [{"Ref": "EnableTracing"}, "true"]}
    assert when_true == "Active"
    assert when_false in ("PassThrough", {"Ref": "AWS::NoValue"})


def test_reserved_concurrency_is_optional_and_off_by_default(template: dict[str, Any]) -> None:
    # GIVEN the parameter: -1, the default, reserves nothing
    parameter = template["Parameters"]["ReservedConcurrency"]
    assert (parameter["Type"], parameter["Default"], parameter["MinValue"]) == ("Number", -1, -1)

    # THEN the function reserves concurrency only when it is set
    reserved = function_properties(template, FUNCTION)["ReservedConcurrentExecutions"]
    condition, when_true, when_false = reserved["Fn::If"]
    assert template["Conditions"][condition] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "ReservedConcurrency"}, "-1"]}]}
    assert (when_true, when_false) == ({"Ref": "ReservedConcurrency"}, {"Ref": "AWS::NoValue"})
    # and the parameter says how to size it: below the queue's MaximumConcurrency it throttles the pollers
    events = template["Resources"][FUNCTION]["Properties"]["Events"]
    [maximum] = [e["Properties"]["ScalingConfig"]["MaximumConcurrency"] for e in events.values() if e["Type"] == "SQS"]
    assert f"at least {maximum}" in parameter["Description"] and "MaximumConcurrency" in parameter["Description"]
    assert "WEBHOOK_DEADLINE_MS" in parameter["Description"]


def test_every_parameter_is_in_exactly_one_parameter_group(template: dict[str, Any]) -> None:
    groups = template["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    grouped = [name for group in groups for name in group["Parameters"]]
    assert sorted(grouped) == sorted(template["Parameters"])


# --- least privilege ----------------------------------------------------------------------------------


# Actions without resource-level permissions: "*" is the only resource they accept.
UNSCOPABLE = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}


def test_no_wildcard_resources_or_actions(template: dict[str, Any]) -> None:
    statements = policy_statements(template)
    assert len(statements) >= 3
    for statement in statements:
        if set(as_list(statement.get("Action", []))) <= UNSCOPABLE:
            assert statement["Resource"] == "*", statement
            continue
        assert "NotAction" not in statement and "NotResource" not in statement, statement
        for action in as_list(statement.get("Action", [])):
            assert isinstance(action, str), statement
            assert action != "*" and not action.endswith(":*"), statement
        assert "Resource" in statement or "Principal" in statement, statement
        for text in literal_strings(statement.get("Resource", [])):
            assert "*" not in text, statement


def test_the_function_role_is_the_templates_own_with_inline_policies_only(template: dict[str, Any]) -> None:
    # GIVEN the function's role: the template's own. (Left to SAM, an SQS event and tracing attach AWS managed
    # policies whose statements allow every queue and every log group in the account.)
    props = template["Resources"][FUNCTION]["Properties"]
    assert props["Role"] == {"Fn::GetAtt": ["RelayFunctionRole", "Arn"]}
    assert "Policies" not in props  # SAM would add these to a role of its own making
    role = template["Resources"]["RelayFunctionRole"]
    assert role["Type"] == "AWS::IAM::Role"

    # THEN it has no managed policies, only inline documents, and it can be assumed by Lambda only
    assert "ManagedPolicyArns" not in role["Properties"]
    [trust] = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert (trust["Principal"], trust["Action"]) == ({"Service": "lambda.amazonaws.com"}, "sts:AssumeRole")
    for policy in role["Properties"]["Policies"]:
        assert "PolicyDocument" in policy or "Fn::If" in policy, policy


def test_logs_and_the_event_source_are_scoped_to_the_functions_own_resources(template: dict[str, Any]) -> None:
    for action in ("logs:CreateLogStream", "logs:PutLogEvents"):
        [statement] = statements_granting(template, action)
        assert statement["Resource"] == {"Fn::GetAtt": ["RelayLogGroup", "Arn"]}
    assert function_properties(template, FUNCTION)["LoggingConfig"]["LogGroup"] == {"Ref": "RelayLogGroup"}
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"):
        [statement] = statements_granting(template, action)
        assert statement["Resource"] == {"Fn::GetAtt": [QUEUE, "Arn"]}


def test_x_ray_may_be_written_only_when_tracing_is_on(template: dict[str, Any]) -> None:
    policies = template["Resources"]["RelayFunctionRole"]["Properties"]["Policies"]
    [conditional] = [p for p in policies if "Fn::If" in p and p["Fn::If"][0] == "TracingEnabled"]
    condition, when_true, when_false = conditional["Fn::If"]
    assert (condition, when_false) == ("TracingEnabled", {"Ref": "AWS::NoValue"})
    actions = {a for s in when_true["PolicyDocument"]["Statement"] for a in as_list(s["Action"])}
    assert actions == UNSCOPABLE
    unconditional = [p for p in policies if "Fn::If" not in p]
    assert not [s for s in policy_statements({"p": unconditional}) if set(as_list(s["Action"])) & UNSCOPABLE]


def test_secrets_are_readable_exactly_for_the_two_parameters_and_the_identity_key(template: dict[str, Any]) -> None:
    statements = [s for s in policy_statements(template) if any("secretsmanager" in a for a in as_list(s["Action"]))]
    assert statements, "the function must be allowed to read its secrets"
    for statement in statements:
        assert as_list(statement["Action"]) == ["secretsmanager:GetSecretValue"]
    granted = [r for s in statements for r in as_list(s["Resource"])]
    assert sorted(granted, key=str) == [
        {"Ref": "AdobeSecretArn"},
        {"Ref": "IdentityKeySecret"},
        {"Ref": "WebhookSecretArn"},
    ]
    assert template["Parameters"]["WebhookSecretArn"]["AllowedPattern"].startswith("^arn:aws")
    assert template["Parameters"]["AdobeSecretArn"]["AllowedPattern"].startswith("^$|^arn:aws")  # empty: EdgeAuth=none


def test_the_function_may_call_exactly_the_dynamodb_operations_its_store_calls(template: dict[str, Any]) -> None:
    # The operations named in the store's code: `self._call("op", ...)`, `self._until_processed("op", ...)` and
    # `self._ddb.op(...)`.
    source = (ROOT / "functions/relay/relay/integrations/store.py").read_text(encoding="utf-8")
    named = re.findall(r'(?:_call|_until_processed)\(\s*"([a-z_]+)"', source)
    ops = set(named) | set(re.findall(r"_ddb\.([a-z_]+)\(", source))
    assert {"update_item", "batch_write_item", "batch_get_item"} <= ops  # the scan finds the calls
    # BatchExecuteStatement is authorised per statement (its PartiQL verb); the store's statements are INSERTs only.
    assert set(re.findall(r"\b(INSERT|SELECT|UPDATE|DELETE|EXISTS)\b", source)) == {"INSERT"}
    partiql = {"batch_execute_statement": "PartiQLInsert"}
    used = {"dynamodb:" + (partiql.get(op) or "".join(part.title() for part in op.split("_"))) for op in ops}
    granted = {a for s in statements_granting_prefix(template, "dynamodb:") for a in as_list(s["Action"])}
    assert granted == used


def test_bench_costs_the_template_memory_size(template: dict[str, Any]) -> None:
    from devtools.bench import RECOMMENDED_MB

    assert function_properties(template, FUNCTION)["MemorySize"] == RECOMMENDED_MB


def statements_granting_prefix(template: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [s for s in policy_statements(template) if any(a.startswith(prefix) for a in as_list(s["Action"]))]


def test_table_and_queue_access_is_scoped(template: dict[str, Any]) -> None:
    dynamo = [s for s in policy_statements(template) if any(a.startswith("dynamodb:") for a in as_list(s["Action"]))]
    assert dynamo
    for statement in dynamo:
        assert as_list(statement["Resource"]) == [{"Fn::GetAtt": [TABLE, "Arn"]}]
        assert not {"dynamodb:Scan", "dynamodb:DeleteTable"} & set(as_list(statement["Action"]))
    for action in ("sqs:SendMessage", "sqs:ChangeMessageVisibility"):
        granted = statements_granting(template, action)
        assert granted, action
        for statement in granted:
            assert as_list(statement["Resource"]) == [{"Fn::GetAtt": [QUEUE, "Arn"]}]


# --- outputs ------------------------------------------------------------------------------------------


def test_outputs_exist(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert set(outputs) >= {"ApiUrl", "QueueUrl", "DeadLetterQueueUrl", "TableName", "FunctionName"}
    api_url = outputs["ApiUrl"]["Value"]["Fn::Sub"]
    assert "${RelayHttpApi}" in api_url and api_url.endswith("/events")
    assert outputs["QueueUrl"]["Value"] == {"Ref": QUEUE}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": DLQ}
    assert outputs["TableName"]["Value"] == {"Ref": TABLE}
    assert outputs["FunctionName"]["Value"] == {"Ref": FUNCTION}


# --- alarms and dashboard (operations; docs/operations.md) ----------------------------------------------

APP_NAMESPACE = "InteractRelay"
APP_DIMENSIONS = [{"Name": "service", "Value": {"Ref": "AWS::StackName"}}]  # the function's POWERTOOLS_SERVICE_NAME
ALARM_TOPIC_ACTIONS = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}

# alarm -> (namespace, metric names the alarm reads, dimensions)
EXPECTED_ALARMS: dict[str, tuple[str, set[str], list[dict[str, Any]]]] = {
    "DeadLetterQueueAlarm": (
        "AWS/SQS",
        {"ApproximateNumberOfMessagesVisible"},
        [{"Name": "QueueName", "Value": {"Fn::GetAtt": [DLQ, "QueueName"]}}],
    ),
    "DeadLetterQueueOldestMessageAlarm": (
        "AWS/SQS",
        {"ApproximateAgeOfOldestMessage"},
        [{"Name": "QueueName", "Value": {"Fn::GetAtt": [DLQ, "QueueName"]}}],
    ),
    "QueueOldestMessageAlarm": (
        "AWS/SQS",
        {"ApproximateAgeOfOldestMessage"},
        [{"Name": "QueueName", "Value": {"Fn::GetAtt": [QUEUE, "QueueName"]}}],
    ),
    "FunctionErrorRateAlarm": (
        "AWS/Lambda",
        {"Errors", "Invocations"},
        [{"Name": "FunctionName", "Value": {"Ref": FUNCTION}}],
    ),
    "FunctionThrottlesAlarm": ("AWS/Lambda", {"Throttles"}, [{"Name": "FunctionName", "Value": {"Ref": FUNCTION}}]),
    "EdgeUnavailableRateAlarm": (APP_NAMESPACE, {"EdgeUnavailable", "EdgeLatency"}, APP_DIMENSIONS),
    "EdgeThrottledRateAlarm": (APP_NAMESPACE, {"EdgeThrottled", "EdgeLatency"}, APP_DIMENSIONS),
    "QueueFallbackFailedAlarm": (APP_NAMESPACE, {"QueueFallbackFailed"}, APP_DIMENSIONS),
    "UnexpectedErrorsAlarm": (APP_NAMESPACE, {"UnexpectedErrors"}, APP_DIMENSIONS),
    "WebhookAuthUnavailableAlarm": (APP_NAMESPACE, {"WebhookAuthUnavailable"}, APP_DIMENSIONS),
    "EdgeRejectedRateAlarm": (APP_NAMESPACE, {"EdgeRejected", "EdgeLatency"}, APP_DIMENSIONS),
    "RelayRefusedRateAlarm": (APP_NAMESPACE, {"RefusedByRelay"}, APP_DIMENSIONS),
    "CredentialsUnavailableAlarm": (APP_NAMESPACE, {"CredentialsUnavailable"}, APP_DIMENSIONS),
    "StateWriteFailedAlarm": (APP_NAMESPACE, {"StateWriteFailed"}, APP_DIMENSIONS),
    # counted from the HTTP API's access log by a metric filter, not emitted by the code
    "WebhookThrottledAlarm": (APP_NAMESPACE, {"WebhookThrottled"}, APP_DIMENSIONS),
    # API Gateway's own count: also the 5xx it gives when it cannot invoke the function at all
    "WebhookServerErrorsAlarm": ("AWS/ApiGateway", {"5xx"}, [{"Name": "ApiId", "Value": {"Ref": "RelayHttpApi"}}]),
}

HTTP_API_DIMENSIONS = [{"Name": "ApiId", "Value": {"Ref": "RelayHttpApi"}}]
# alarm -> (namespace, metric, dimensions) of each metric it reads, for an alarm reading more than one namespace
EXPECTED_MIXED_ALARMS: dict[str, list[tuple[str, str, list[dict[str, Any]]]]] = {
    # the relay's count of refused signatures against every request the HTTP API received
    "WebhookUnauthorizedRateAlarm": [
        (APP_NAMESPACE, "Unauthorized", APP_DIMENSIONS),
        ("AWS/ApiGateway", "Count", HTTP_API_DIMENSIONS),
    ],
}


def emitted_metrics() -> set[str]:
    """Every metric name the function's code emits: the string literals in its `count(...)`/`timing(...)` calls."""
    names: set[str] = set()
    for path in (Path(__file__).resolve().parents[2] / "functions" / "relay" / "relay").rglob("*.py"):
        for call in re.findall(r"\b(?:count|timing)\((.*)", path.read_text(encoding="utf-8")):  # each call is one line
            names.update(re.findall(r'"([A-Z][A-Za-z]+)"', call))
    return names


# Metrics the function emits: the dashboard must show each of these (read from the code, so a new one cannot be
# left off; the list below only guards the reading itself).
DASHBOARD_APP_METRICS = emitted_metrics()


def test_the_metric_names_are_read_from_the_code() -> None:
    assert {"Delivered", "EdgeLatency", "EdgeUnavailable", "StateNotSent"} <= DASHBOARD_APP_METRICS


def log_metrics(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics of the relay's namespace that metric filters publish from logs (not the code): name -> transformation."""
    return {
        t["MetricName"]: t
        for f in resources(template, "AWS::Logs::MetricFilter").values()
        for t in f["Properties"]["MetricTransformations"]
        if t["MetricNamespace"] == APP_NAMESPACE
    }


def test_every_relay_metric_an_alarm_reads_is_published(template: dict[str, Any]) -> None:
    # GIVEN every metric of the relay's namespace that an alarm reads
    read = {
        metric
        for alarm in resources(template, "AWS::CloudWatch::Alarm").values()
        for namespace, metric, _ in alarm_metrics(alarm["Properties"])
        if namespace == APP_NAMESPACE
    }

    # THEN the code emits it, or a metric filter publishes it from a log: no alarm waits on a metric nobody writes
    assert read - DASHBOARD_APP_METRICS - set(log_metrics(template)) == set()
    assert "WebhookThrottled" in read - DASHBOARD_APP_METRICS


ACCESS_LOG_FIELDS = {
    "requestId",
    "ip",
    "requestTime",
    "routeKey",
    "status",
    "responseLength",
    "latency",
    "integrationError",
    "service",
}


def test_api_gateway_throttling_is_counted_from_the_access_log_as_the_alarm_reads_it(
    template: dict[str, Any],
) -> None:
    # GIVEN the HTTP API's access log line as a stack named "staging-relay" writes it: the fields it always had, and
    # the stack's service (a metric filter's dimensions can only come from the log line's fields)
    text = template["Resources"]["RelayHttpApi"]["Properties"]["AccessLogSettings"]["Format"]["Fn::Sub"]
    assert re.findall(r"\$\{([^}]+)\}", text) == ["AWS::StackName"]  # every other $context variable is API Gateway's
    line = json.loads(text.replace("${AWS::StackName}", "staging-relay"))
    assert set(line) == ACCESS_LOG_FIELDS
    assert (line["status"], line["service"]) == ("$context.status", "staging-relay")

    # WHEN a metric filter on that log counts the requests API Gateway refused as throttled
    [(_, metric_filter)] = resources(template, "AWS::Logs::MetricFilter").items()
    props = metric_filter["Properties"]
    assert props["LogGroupName"] == {"Ref": "ApiAccessLogGroup"}
    assert props["FilterPattern"] == '{ $.status = "429" }'
    [transformation] = props["MetricTransformations"]
    assert (transformation["MetricName"], transformation["MetricValue"]) == ("WebhookThrottled", "1")
    assert transformation["Dimensions"] == [{"Key": "service", "Value": "$.service"}]

    # THEN it publishes the metric, under the namespace and the service the alarm reads (the stack name, as for
    # every metric of the relay)
    alarm = template["Resources"]["WebhookThrottledAlarm"]["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == (transformation["MetricNamespace"], "WebhookThrottled")
    assert alarm["Dimensions"] == APP_DIMENSIONS
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (
        "Sum",
        300,
        2,
        2,
    )
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    # and only API Gateway answers 429: the relay's own answers (webhook.py, errors.py) never do
    for module in ("webhook.py", "errors.py"):
        source = (ROOT / "functions/relay/relay" / module).read_text(encoding="utf-8")
        assert not re.search(r"\b429\b", source), f"{module} answers 429: the filter would count the relay's own"


def alarm_metrics(props: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(namespace, metric, dimensions) of every metric an alarm reads (single metric or metric math)."""
    if "MetricName" in props:
        return [(props["Namespace"], props["MetricName"], props.get("Dimensions", []))]
    found = []
    for query in props["Metrics"]:
        if "MetricStat" in query:
            metric = query["MetricStat"]["Metric"]
            found.append((metric["Namespace"], metric["MetricName"], metric.get("Dimensions", [])))
    return found


@pytest.mark.parametrize("name", sorted([*EXPECTED_ALARMS, *EXPECTED_MIXED_ALARMS]))
def test_alarm_watches_the_right_metric(template: dict[str, Any], name: str) -> None:
    alarm = template["Resources"].get(name)
    assert alarm is not None, f"missing alarm {name}"
    assert alarm["Type"] == "AWS::CloudWatch::Alarm"
    props = alarm["Properties"]
    read = alarm_metrics(props)
    if name in EXPECTED_MIXED_ALARMS:
        assert sorted(read, key=lambda m: m[1]) == sorted(EXPECTED_MIXED_ALARMS[name], key=lambda m: m[1])
    else:
        namespace, metric_names, dimensions = EXPECTED_ALARMS[name]
        assert {m for _, m, _ in read} == metric_names
        for ns, _, dims in read:
            assert ns == namespace
            assert dims == dimensions
    assert props["ComparisonOperator"].startswith("GreaterThan")
    assert props["TreatMissingData"] == "notBreaching"
    # Notifications go to the optional topic, for both ALARM and OK.
    assert props["AlarmActions"] == ALARM_TOPIC_ACTIONS
    assert props["OKActions"] == ALARM_TOPIC_ACTIONS
    if "Metrics" in props:  # metric math: exactly one returned expression, guarded against division by zero
        returned = [q for q in props["Metrics"] if q.get("ReturnData", True)]
        assert len(returned) == 1 and "Expression" in returned[0]
        assert returned[0]["Expression"].startswith("IF(")


def test_rate_alarms_divide_by_the_right_denominator(template: dict[str, Any]) -> None:
    res = template["Resources"]
    ids = {q["Id"]: q for q in res["FunctionErrorRateAlarm"]["Properties"]["Metrics"]}
    assert ids["errors"]["MetricStat"]["Metric"]["MetricName"] == "Errors"
    assert ids["invocations"]["MetricStat"]["Metric"]["MetricName"] == "Invocations"
    assert "errors" in ids["errorRate"]["Expression"] and "/ invocations" in ids["errorRate"]["Expression"]
    for name, numerator in (
        ("EdgeUnavailableRateAlarm", "unavailable"),
        ("EdgeThrottledRateAlarm", "throttled"),
        ("EdgeRejectedRateAlarm", "rejected"),
    ):
        ids = {q["Id"]: q for q in res[name]["Properties"]["Metrics"]}
        calls = ids["calls"]["MetricStat"]
        assert calls["Metric"]["MetricName"] == "EdgeLatency" and calls["Stat"] == "SampleCount"
        assert ids[numerator]["MetricStat"]["Stat"] == "Sum"
        returned = next(q for q in ids.values() if q.get("ReturnData", True))
        assert numerator in returned["Expression"] and "/ calls" in returned["Expression"]
    ids = {q["Id"]: q for q in res["WebhookUnauthorizedRateAlarm"]["Properties"]["Metrics"]}
    assert ids["requests"]["MetricStat"]["Stat"] == ids["unauthorized"]["MetricStat"]["Stat"] == "Sum"
    assert "FILL(unauthorized, 0) / requests" in ids["unauthorizedRate"]["Expression"]


def test_the_relay_refusal_alarm_averages_one_value_per_finished_event(template: dict[str, Any]) -> None:
    # GIVEN the alarm on the relay's own refusals (test_core_process_event shows the function writes RefusedByRelay
    # once per finished event: 1 refused by the relay, 0 delivered or refused by Edge)
    props = template["Resources"]["RelayRefusedRateAlarm"]["Properties"]

    # THEN it fires on the share refused: over a tenth of the events finished, in three 5-minute periods in a row
    assert (props["MetricName"], props["Statistic"], props["Period"]) == ("RefusedByRelay", "Average", 300)
    assert (props["Threshold"], props["EvaluationPeriods"], props["DatapointsToAlarm"]) == (0.1, 3, 3)
    assert "docs/operations.md#relay-refused-rate" in props["AlarmDescription"]


def test_dead_letter_and_fallback_alarms_fire_on_the_first_message(template: dict[str, Any]) -> None:
    for name in (
        "DeadLetterQueueAlarm",
        "QueueFallbackFailedAlarm",
        "FunctionThrottlesAlarm",
        "UnexpectedErrorsAlarm",
        "WebhookAuthUnavailableAlarm",
    ):
        props = template["Resources"][name]["Properties"]
        assert props["Threshold"] == 0 and props["ComparisonOperator"] == "GreaterThanThreshold", name
        assert props["EvaluationPeriods"] == 1, name


def test_alarm_topic_parameter_is_optional(template: dict[str, Any]) -> None:
    parameter = template["Parameters"]["AlarmTopicArn"]
    assert parameter["Default"] == ""
    assert template["Conditions"]["HasAlarmTopic"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmTopicArn"}, ""]}]}


def dashboard_body(template: dict[str, Any]) -> dict[str, Any]:
    dashboards = resources(template, "AWS::CloudWatch::Dashboard")
    assert len(dashboards) == 1
    (dashboard,) = dashboards.values()
    body = dashboard["Properties"]["DashboardBody"]
    text = body["Fn::Sub"] if isinstance(body, dict) else body
    assert isinstance(text, str)
    # Every ${...} must name a pseudo parameter or a resource of this template.
    for ref in re.findall(r"\$\{([^}!]+)\}", text):
        logical = ref.split(".", 1)[0]
        assert logical.startswith("AWS::") or logical in template["Resources"], ref
    parsed: dict[str, Any] = json.loads(re.sub(r"\$\{([^}]+)\}", lambda m: "SUB_" + m.group(1), text))
    return parsed


def test_dashboard_shows_every_metric_an_operator_needs(template: dict[str, Any]) -> None:
    body = dashboard_body(template)
    metrics: list[list[Any]] = []
    for widget in body["widgets"]:
        metrics.extend(widget.get("properties", {}).get("metrics", []))
    shown = {(m[0], m[1]) for m in metrics}
    for name in DASHBOARD_APP_METRICS:
        assert (APP_NAMESPACE, name) in shown, name
    for m in metrics:
        if m[0] == APP_NAMESPACE:
            assert m[2:4] == ["service", "SUB_AWS::StackName"], m
    # Edge latency percentiles.
    stats = {m[4]["stat"] for m in metrics if m[1] == "EdgeLatency" and len(m) > 4 and isinstance(m[4], dict)}
    assert stats >= {"p50", "p90", "p99"}
    # Metrics published from logs (API Gateway's throttling).
    for name in log_metrics(template):
        assert (APP_NAMESPACE, name) in shown, name
    # Queue and dead-letter queue depth.
    depth = [m for m in metrics if m[0] == "AWS/SQS" and m[1] == "ApproximateNumberOfMessagesVisible"]
    assert {m[3] for m in depth} >= {f"SUB_{QUEUE}.QueueName", f"SUB_{DLQ}.QueueName"}
    # The events queue's delayed messages: the webhook fallback sends with DelaySeconds (up to 900 s), and those are
    # neither visible nor in flight.
    queue = {m[1] for m in metrics if m[0] == "AWS/SQS" and m[2:4] == ["QueueName", f"SUB_{QUEUE}.QueueName"]}
    assert queue >= {
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    }
    # Lambda errors, throttles, duration.
    lambda_metrics = {m[1] for m in metrics if m[0] == "AWS/Lambda" and m[3] == f"SUB_{FUNCTION}"}
    assert lambda_metrics >= {"Errors", "Throttles", "Duration", "Invocations"}


def test_every_alarm_has_the_runbook_section_its_description_links_to(template: dict[str, Any]) -> None:
    # GIVEN docs/operations.md's sections, one per alarm, named by the alarm's name after the stack's
    runbook = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^### ([a-z0-9-]+)$", runbook, re.M))
    for name, alarm in resources(template, "AWS::CloudWatch::Alarm").items():
        props = alarm["Properties"]
        suffix = props["AlarmName"]["Fn::Sub"].removeprefix("${AWS::StackName}-")

        # THEN each alarm has its section, and its description sends the operator there
        assert suffix in sections, name
        assert f"docs/operations.md#{suffix}" in props["AlarmDescription"], name


def test_dashboard_shows_every_alarm(template: dict[str, Any]) -> None:
    body = dashboard_body(template)
    shown = {a for w in body["widgets"] if w["type"] == "alarm" for a in w["properties"]["alarms"]}
    alarms = resources(template, "AWS::CloudWatch::Alarm")
    assert shown == {f"SUB_{name}.Arn" for name in alarms}


ENV = {"HANDLES_TABLE": "handles", "DATASTREAM_ID": "ds-1", "ADOBE_SECRET_ID": "a", "WEBHOOK_SECRET_ID": "w"}


def starts(variables: dict[str, str]) -> bool:
    """Whether the function starts with these variables (on top of ENV)."""
    try:
        load_settings({**ENV, **variables})
    except ConfigurationError:
        return False
    return True


@pytest.mark.parametrize(
    ("parameter", "variable", "high"),
    [("BatchConcurrency", "BATCH_CONCURRENCY", 64), ("ResultTtlDays", "RESULT_TTL_DAYS", 3650)],
)
def test_a_number_parameter_allows_exactly_what_the_function_accepts(
    template: dict[str, Any], parameter: str, variable: str, high: int
) -> None:
    # GIVEN the parameter's pattern (a String: CloudFormation's Number takes 16.5, which the function refuses)
    spec = template["Parameters"][parameter]
    assert spec["Type"] == "String" and str(spec["Default"]) == spec["Default"]
    allowed = re.compile(spec["AllowedPattern"])

    # THEN it lets through exactly the whole numbers the function starts with, and of the other spellings a user
    # might try, none the function refuses (it may refuse some the function would take, such as 07)
    for n in range(0, high + 2):
        assert bool(allowed.fullmatch(str(n))) == starts({variable: str(n)}), n
    for candidate in ["16.5", "7.0", "07", " 7", "1e1", "-1", "+5", ""]:
        assert not allowed.fullmatch(candidate) or starts({variable: candidate}), candidate
    assert not allowed.fullmatch("16.5") and allowed.fullmatch(spec["Default"])


@pytest.mark.parametrize(
    ("parameter", "variable"), [("EdgeBaseUrl", "EDGE_BASE_URL"), ("ImsTokenUrl", "IMS_TOKEN_URL")]
)
def test_a_url_parameter_lets_through_no_url_the_function_refuses(
    template: dict[str, Any], parameter: str, variable: str
) -> None:
    # GIVEN the parameter's pattern
    allowed = re.compile(template["Parameters"][parameter]["AllowedPattern"])

    # THEN every value it lets through is one the function starts with (ports past 65535 went through before)
    candidates = [f"https://edge.adobedc.net:{port}" for port in (0, 1, 443, 65535, 65536, 99999)]
    candidates += ["https://edge.adobedc.net", "https://[ims/x", "https://ims-na1.adobelogin.com/ims/token/v3"]
    for candidate in candidates:
        if allowed.fullmatch(candidate):
            assert starts({variable: candidate}), candidate
    assert allowed.fullmatch(template["Parameters"][parameter]["Default"])
    assert not allowed.fullmatch("https://edge.adobedc.net:65536")


def test_the_datastream_parameter_allows_only_ids_the_function_accepts(template: dict[str, Any]) -> None:
    # GIVEN the parameter's pattern and length
    spec = template["Parameters"]["DatastreamId"]
    allowed = re.compile(spec["AllowedPattern"])
    candidates = ["a", "0" * 128, "ds-1_x:y.z", "abc-", "-abc", "_x", "a b", "a/b", "a" * 129, "é"]

    # THEN each id the template lets through is one the function starts with
    for candidate in candidates:
        if allowed.match(candidate) and spec["MinLength"] <= len(candidate) <= spec["MaxLength"]:
            load_settings({**ENV, "DATASTREAM_ID": candidate})
        else:
            with pytest.raises(ConfigurationError):
                load_settings({**ENV, "DATASTREAM_ID": candidate})


def test_the_allowed_datastreams_parameter_allows_only_lists_the_function_accepts(template: dict[str, Any]) -> None:
    # GIVEN the parameter's pattern and length (CloudFormation checks the pattern against the whole value)
    spec = template["Parameters"]["AllowedDatastreamIds"]
    allowed = re.compile(spec["AllowedPattern"])
    candidates = ["", "a", "ds-1,ds-2", "0" * 128, "a," + "0" * 129, "ds-1, ds-2", "ds-1,", ",ds-1", "a/b", "é"]

    # THEN each value the template lets through is one the function starts with
    for candidate in candidates:
        if allowed.fullmatch(candidate) and len(candidate) <= spec["MaxLength"]:
            load_settings({**ENV, "ALLOWED_DATASTREAM_IDS": candidate})
        else:
            assert candidate not in ("", "a", "ds-1,ds-2"), candidate
    assert not allowed.fullmatch("a," + "0" * 129)  # an entry the function would refuse at every invocation


def conditional_policy(template: dict[str, Any], condition: str) -> list[dict[str, Any]]:
    """The statements of the role's policy that exists only under `condition`."""
    policies = template["Resources"]["RelayFunctionRole"]["Properties"]["Policies"]
    [(name, when_true, when_false)] = [p["Fn::If"] for p in policies if "Fn::If" in p and p["Fn::If"][0] == condition]
    assert when_false == {"Ref": "AWS::NoValue"}
    return list(when_true["PolicyDocument"]["Statement"])


def test_the_adobe_secret_is_used_and_readable_only_with_ims_and_then_required(template: dict[str, Any]) -> None:
    assert template["Conditions"]["UsesIms"] == {"Fn::Equals": [{"Ref": "EdgeAuth"}, "ims"]}
    [statement] = conditional_policy(template, "UsesIms")
    assert (statement["Action"], statement["Resource"]) == ("secretsmanager:GetSecretValue", {"Ref": "AdobeSecretArn"})
    parameter = template["Parameters"]["AdobeSecretArn"]
    assert "Default" not in parameter and parameter["AllowedPattern"].startswith("^$|^arn:aws")
    rule = template["Rules"]["ImsNeedsTheAdobeSecret"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "EdgeAuth"}, "ims"]}
    assert rule["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AdobeSecretArn"}, ""]}]}


def test_the_unauthenticated_edge_mode_refuses_the_authenticated_host(template: dict[str, Any]) -> None:
    rule = template["Rules"]["UnauthenticatedEdgeNeedsItsOwnHost"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "EdgeAuth"}, "none"]}
    [[refused, ref]] = [rule["Assertions"][0]["Assert"]["Fn::Not"][0]["Fn::Contains"]]
    assert ref == {"Ref": "EdgeBaseUrl"} and CONTRACT_DEFAULTS["EdgeBaseUrl"] in refused
    # Every spelling of the authenticated host the parameter lets through is refused here, as the function refuses
    # it (it compares the host name, in lower case, and the port): a deploy never succeeds only to fail every call
    allowed = re.compile(template["Parameters"]["EdgeBaseUrl"]["AllowedPattern"])
    unauthenticated = {k: v for k, v in ENV.items() if k != "ADOBE_SECRET_ID"} | {"EDGE_AUTH": "none"}
    for spelling in ("https://server.adobedc.net", "https://server.adobedc.net:443", "https://SERVER.adobedc.net"):
        if allowed.fullmatch(spelling):
            assert spelling in refused, spelling
        assert not starts({**unauthenticated, "EDGE_BASE_URL": spelling})
    assert starts({**unauthenticated, "EDGE_BASE_URL": "https://edge.adobedc.net"})


def test_a_customer_managed_key_on_the_secrets_may_decrypt_only_through_secrets_manager(
    template: dict[str, Any],
) -> None:
    assert template["Parameters"]["SecretsKmsKeyArn"]["Default"] == ""
    [statement] = conditional_policy(template, "HasSecretsKmsKey")
    assert (statement["Action"], statement["Resource"]) == ("kms:Decrypt", {"Ref": "SecretsKmsKeyArn"})
    assert statement["Condition"] == {
        "StringEquals": {"kms:ViaService": {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"}}
    }
    assert [s for s in policy_statements(template) if "kms:Decrypt" in as_list(s["Action"])] == [statement]


def test_names_that_must_not_clash_across_stacks(template: dict[str, Any]) -> None:
    resources_ = template["Resources"]
    assert resources_["DepsLayer"]["Properties"]["LayerName"] == {"Fn::Sub": "${AWS::StackName}-deps"}
    # API Gateway adds its access log group to the account's (size-limited) Logs resource policy: near the limit,
    # only /aws/vendedlogs/ names are accepted.
    group = resources_["ApiAccessLogGroup"]["Properties"]["LogGroupName"]["Fn::Sub"]
    assert group.startswith("/aws/vendedlogs/")


def test_the_identity_key_is_generated_kept_with_the_table_and_given_to_the_function(template: dict[str, Any]) -> None:
    secret = template["Resources"]["IdentityKeySecret"]
    assert secret["Type"] == "AWS::SecretsManager::Secret"
    generate = secret["Properties"]["GenerateSecretString"]
    assert (generate["GenerateStringKey"], generate["SecretStringTemplate"]) == ("key", "{}")
    assert generate["PasswordLength"] >= 64 and generate["ExcludePunctuation"] is True
    # A new key would orphan every identity state: it lives exactly as long as the table.
    table = template["Resources"][TABLE]
    assert (secret["DeletionPolicy"], secret["UpdateReplacePolicy"]) == (table["DeletionPolicy"], "Retain")
    variables = function_properties(template, FUNCTION)["Environment"]["Variables"]
    assert variables["IDENTITY_KEY_SECRET_ID"] == {"Ref": "IdentityKeySecret"}


def test_the_identity_keys_generation_settings_are_as_first_shipped(template: dict[str, Any]) -> None:
    # CloudFormation generates a new secret value whenever `GenerateSecretString` changes: an edit here would give every
    # deployment that updates to it a new identity key, orphaning each stored identity state (and leaving `relayctl
    # forget` unable to find them). This test fails on any edit so that whoever makes one reads why first.
    generate = template["Resources"]["IdentityKeySecret"]["Properties"]["GenerateSecretString"]
    assert generate == {
        "SecretStringTemplate": "{}",
        "GenerateStringKey": "key",
        "PasswordLength": 64,
        "ExcludePunctuation": True,
    }, "never edit IdentityKeySecret's GenerateSecretString: the change regenerates the identity key"


def test_the_metrics_carry_the_service_the_template_sets_which_its_alarms_read(template: dict[str, Any]) -> None:
    # GIVEN the function's environment as a stack named "staging-relay" would set it
    probe = (
        "import json\n"
        "from relay.observability import count, metrics\n"
        "count('Delivered')\n"
        "print(json.dumps(metrics.serialize_metric_set()))\n"
    )

    # WHEN the function counts a metric
    done = fresh_interpreter(probe, POWERTOOLS_SERVICE_NAME="staging-relay")

    # THEN it is in the alarms' namespace under that stack's service, not one shared by every stack
    assert done.returncode == 0, done.stderr
    emf = json.loads(done.stdout)
    [directive] = emf["_aws"]["CloudWatchMetrics"]
    assert (directive["Namespace"], directive["Dimensions"], emf["service"]) == (
        APP_NAMESPACE,
        [["service"]],
        "staging-relay",
    )
    assert template["Globals"]["Function"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"] == {
        "Ref": "AWS::StackName"
    }
