"""The local resources match template.yaml (against a real moto server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.cfn_yaml import load_template
from devtools.moto_server import MotoServer
from devtools.resources import LocalResources, aws_client, create_resources, http_routes

pytestmark = pytest.mark.integration

ADOBE = {"clientId": "cid", "clientSecret": "shh", "orgId": "ORG@AdobeOrg", "scopes": "openid"}
WEBHOOK = {"secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def res(moto: MotoServer, template: dict[str, Any]) -> LocalResources:
    return create_resources(moto.url, template, adobe_secret=ADOBE, webhook_secret=WEBHOOK)


def test_table_matches_the_template(moto: MotoServer, res: LocalResources, template: dict[str, Any]) -> None:
    props = template["Resources"]["HandlesTable"]["Properties"]
    ddb = aws_client("dynamodb", moto.url)
    table = ddb.describe_table(TableName=res.table_name)["Table"]
    assert table["KeySchema"] == props["KeySchema"]
    assert sorted(table["AttributeDefinitions"], key=lambda a: a["AttributeName"]) == sorted(
        props["AttributeDefinitions"], key=lambda a: a["AttributeName"]
    )
    assert table["BillingModeSummary"]["BillingMode"] == props["BillingMode"]
    ttl = ddb.describe_time_to_live(TableName=res.table_name)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": props["TimeToLiveSpecification"]["AttributeName"]}


def test_queues_match_the_template(moto: MotoServer, res: LocalResources, template: dict[str, Any]) -> None:
    queue_props = template["Resources"]["EventsQueue"]["Properties"]
    dlq_props = template["Resources"]["EventsDeadLetterQueue"]["Properties"]
    sqs = aws_client("sqs", moto.url)
    attrs = sqs.get_queue_attributes(QueueUrl=res.queue_url, AttributeNames=["All"])["Attributes"]
    assert int(attrs["VisibilityTimeout"]) == queue_props["VisibilityTimeout"] == res.visibility_timeout
    assert int(attrs["MessageRetentionPeriod"]) == queue_props["MessageRetentionPeriod"]
    assert json.loads(attrs["RedrivePolicy"]) == {
        "deadLetterTargetArn": res.dlq_arn,
        "maxReceiveCount": queue_props["RedrivePolicy"]["maxReceiveCount"],
    }
    assert attrs["QueueArn"] == res.queue_arn
    dlq = sqs.get_queue_attributes(QueueUrl=res.dlq_url, AttributeNames=["All"])["Attributes"]
    assert int(dlq["MessageRetentionPeriod"]) == dlq_props["MessageRetentionPeriod"]
    assert dlq["QueueArn"] == res.dlq_arn


def test_function_settings_come_from_the_template(res: LocalResources, template: dict[str, Any]) -> None:
    sqs_event = template["Resources"]["RelayFunction"]["Properties"]["Events"]["Queue"]["Properties"]
    assert res.function_timeout == template["Globals"]["Function"]["Timeout"]
    assert res.batch_size == sqs_event["BatchSize"]
    assert res.batching_window == sqs_event["MaximumBatchingWindowInSeconds"]
    assert (
        res.max_receive_count == template["Resources"]["EventsQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"]
    )
    assert res.visibility_timeout >= 6 * res.function_timeout


def test_secrets_hold_the_json_values(moto: MotoServer, res: LocalResources) -> None:
    sm = aws_client("secretsmanager", moto.url)
    assert json.loads(sm.get_secret_value(SecretId=res.adobe_secret_id)["SecretString"]) == ADOBE
    assert json.loads(sm.get_secret_value(SecretId=res.webhook_secret_id)["SecretString"]) == WEBHOOK
    assert res.adobe_secret_id.startswith("arn:aws:secretsmanager:us-east-1:")


def test_create_resources_is_idempotent(moto: MotoServer, res: LocalResources, template: dict[str, Any]) -> None:
    again = create_resources(moto.url, template, adobe_secret=ADOBE, webhook_secret={"secrets": ["whsec_new"]})
    assert (again.table_name, again.queue_url, again.dlq_url) == (res.table_name, res.queue_url, res.dlq_url)
    sm = aws_client("secretsmanager", moto.url)
    assert json.loads(sm.get_secret_value(SecretId=again.webhook_secret_id)["SecretString"]) == {
        "secrets": ["whsec_new"]
    }


def test_resources_follow_a_changed_template(moto: MotoServer, template: dict[str, Any]) -> None:
    # GIVEN a template with other sizes
    changed = json.loads(json.dumps(template))
    changed["Globals"]["Function"]["Timeout"] = 10
    changed["Resources"]["EventsQueue"]["Properties"]["VisibilityTimeout"] = 60
    changed["Resources"]["EventsQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"] = 3
    changed["Resources"]["RelayFunction"]["Properties"]["Events"]["Queue"]["Properties"]["BatchSize"] = 7
    # WHEN resources are created from it
    res = create_resources(moto.url, changed, adobe_secret=ADOBE, webhook_secret=WEBHOOK, prefix="changed")
    # THEN they follow it
    assert (res.function_timeout, res.visibility_timeout, res.max_receive_count, res.batch_size) == (10, 60, 3, 7)


def test_http_routes_are_the_template_ones(template: dict[str, Any]) -> None:
    assert http_routes(template) == {("POST", "/events")}
