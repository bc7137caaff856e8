"""A stand-in for the Lambda runtime's context object."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

DEFAULT_FUNCTION_NAME = "interact-relay-local"
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "123456789012"


@dataclass
class LambdaContext:
    """Mirrors the attributes and method of ``awslambdaric``'s ``LambdaContext``."""

    function_name: str
    function_version: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str
    deadline_ms: int = field(repr=False)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self.deadline_ms - int(time.time() * 1000))


def new_context(
    timeout_s: float,
    function_name: str = DEFAULT_FUNCTION_NAME,
    *,
    memory_limit_in_mb: int = 256,
    region: str = DEFAULT_REGION,
    account_id: str = DEFAULT_ACCOUNT,
) -> LambdaContext:
    """Return a context for one invocation whose deadline is now + ``timeout_s``."""
    now = time.time()
    day = time.strftime("%Y/%m/%d", time.gmtime(now))
    return LambdaContext(
        function_name=function_name,
        function_version="$LATEST",
        invoked_function_arn=f"arn:aws:lambda:{region}:{account_id}:function:{function_name}",
        memory_limit_in_mb=memory_limit_in_mb,
        aws_request_id=str(uuid.uuid4()),
        log_group_name=f"/aws/lambda/{function_name}",
        log_stream_name=f"{day}/[$LATEST]{uuid.uuid4().hex}",
        deadline_ms=int((now + timeout_s) * 1000),
    )
