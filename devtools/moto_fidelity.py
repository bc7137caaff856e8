"""Give moto's DynamoDB PartiQL `INSERT` the behaviour DynamoDB documents, and make moto's SQS queues safe to use from
several pollers at once, for the local stack and the tests.

moto 5.2 runs a PartiQL statement by handing every table, converted to JSON, to py-partiql-parser. For an `INSERT`
that has two consequences the relay cannot live with in its tests:

- an `INSERT` whose key already exists **replaces the item**, where DynamoDB refuses it with `DuplicateItem`
  ("If the DynamoDB table already has an item with the same primary key ..., DuplicateItemException is returned":
  https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ql-reference.insert.html). The relay claims new
  events with `INSERT`s (25 to a `BatchExecuteStatement`): against unpatched moto a repeat would overwrite a delivered
  result and be sent to Edge again, so every duplicate test would test moto's bug;
- each statement copies every table (its cost grows with the tables, as with moto's `TransactWriteItems`).

`install()` routes the one statement shape this project sends, ``INSERT INTO "<table>" VALUE {'<name>': ?, ...}``
with one parameter per attribute, to moto's own conditional `put_item` (`attribute_not_exists` on the table's hash key:
DynamoDB's `INSERT` semantics, one item looked up); a key that exists answers `DuplicateItem` and leaves the item
alone. Every other statement goes to moto unchanged. `tests/unit/test_moto_fidelity.py` shows both behaviours and
fails once moto itself refuses duplicates (then this module can go).

**SQS.** moto's server answers requests on many threads, and its SQS queues take no lock around what they change:
`receive_message` scans the queue, marks messages received and moves those past `maxReceiveCount` to the dead-letter
queue; `delete_message` rebuilds the message list. Two pollers receiving at once (as the soak's and the integration
tests' do, and as Lambda's do) can both pick the same message for the dead-letter queue; the second `list.remove`
raises `ValueError`, moto answers 500, and the messages that receive had already marked received are in flight in
no one's hands until the queue's visibility timeout (180 s) brings them back. A traced `make soak` showed exactly
that: 7 messages first seen on their second receive, 180 s after a `ReceiveMessage` that moto answered 500, and the
run waiting for them. (SQS itself would not lose a receive's answer that way; a lost answer would have the same
effect, which the relay survives: the events were delivered, only late.) `install()` therefore runs moto's
per-queue SQS operations under the queue's own lock (moto's `Condition`, re-entrant, which its long poll releases
while it waits), so one receive's scan and dead-letter moves finish before another's start.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

_INSERT = re.compile(r'\s*INSERT\s+INTO\s+"([^"]+)"\s+VALUE\s+\{(.*)\}\s*', re.IGNORECASE | re.DOTALL)
_FIELD = re.compile(r"\s*'([^']+)'\s*:\s*\?\s*")
_INSTALLED = "_interact_relay_unpatched_batch_execute_statement"
_SQS_INSTALLED = "_interact_relay_unlocked_sqs_operations"
# The SQS backend's operations on one queue's messages (`send_message_batch`, `delete_message_batch` and
# `change_message_visibility_batch` call these per entry).
_SQS_SERIALIZED = ("send_message", "receive_message", "delete_message", "change_message_visibility", "purge_queue")


def insert_shape(statement: str, parameters: list[Any]) -> tuple[str, dict[str, Any]] | None:
    """(table, item) for an `INSERT` of the shape above, else None (moto then runs the statement itself)."""
    match = _INSERT.fullmatch(statement)
    if match is None:
        return None
    names = [_FIELD.fullmatch(part) for part in match.group(2).split(",")]
    if any(name is None for name in names) or len(names) != len(parameters):
        return None
    return match.group(1), {name.group(1): value for name, value in zip(names, parameters, strict=True) if name}


def install() -> None:
    """Patch moto's DynamoDB and SQS backends in this process (idempotent). Call before the first request."""
    _install_insert()
    _install_sqs_locks()


def _locked(original: Callable[..., Any]) -> Callable[..., Any]:
    from moto.sqs.exceptions import QueueDoesNotExist

    @functools.wraps(original)
    def operation(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            queue = self.get_queue(queue_name)
        except QueueDoesNotExist:
            return original(self, queue_name, *args, **kwargs)  # moto's own answer for a missing queue
        with queue._messages_lock:  # an AttributeError here (moto renamed it) must show, not skip the lock
            return original(self, queue_name, *args, **kwargs)

    return operation


def _install_sqs_locks() -> None:
    from moto.sqs.models import SQSBackend

    if getattr(SQSBackend, _SQS_INSTALLED, None) is not None:
        return
    originals = {name: getattr(SQSBackend, name) for name in _SQS_SERIALIZED}
    for name, original in originals.items():
        setattr(SQSBackend, name, _locked(original))
    setattr(SQSBackend, _SQS_INSTALLED, originals)  # kept: the test shows what moto itself does


def unlocked_sqs() -> dict[str, Any]:
    """moto's own SQS operations (after `install()`), by name."""
    from moto.sqs.models import SQSBackend

    originals: dict[str, Any] = getattr(SQSBackend, _SQS_INSTALLED)
    return originals


def _install_insert() -> None:
    from moto.dynamodb.exceptions import ConditionalCheckFailed, ResourceNotFoundException
    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend, _INSTALLED, None) is not None:
        return
    original = DynamoDBBackend.batch_execute_statement

    def batch_execute_statement(self: Any, statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
        responses: list[dict[str, Any]] = []
        for stmt in statements:
            shape = insert_shape(stmt.get("Statement", ""), stmt.get("Parameters") or [])
            if shape is None:
                responses.extend(original(self, [stmt]))
                continue
            table_name, item = shape
            try:
                table = self.get_table(table_name)
                table.put_item(
                    item,
                    condition_expression="attribute_not_exists(#k)",
                    expression_attribute_names={"#k": table.hash_key_attr},
                )
            except ResourceNotFoundException:
                responses.append({"Error": {"Code": "ResourceNotFound", "Message": "Requested resource not found"}})
            except ConditionalCheckFailed:
                message = "Duplicate primary key exists in table"
                responses.append({"TableName": table_name, "Error": {"Code": "DuplicateItem", "Message": message}})
            except Exception as exc:  # what moto would answer for a bad item (wrong key type, ...)
                code = getattr(exc, "error_type", type(exc).__name__).split("#")[-1].removesuffix("Exception")
                responses.append({"Error": {"Code": code, "Message": getattr(exc, "message", str(exc))}})
            else:
                responses.append({"TableName": table_name})
        return responses

    DynamoDBBackend.batch_execute_statement = batch_execute_statement  # type: ignore[method-assign]
    setattr(DynamoDBBackend, _INSTALLED, original)  # kept: the test shows what moto itself does


def unpatched() -> Any:
    """moto's own `batch_execute_statement` (after `install()`)."""
    from moto.dynamodb.models import DynamoDBBackend

    return getattr(DynamoDBBackend, _INSTALLED)


def main(argv: list[str] | None = None) -> None:
    """`python -m devtools.moto_fidelity <moto.server arguments>`: moto's server, patched."""
    install()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
