"""``grpc.health.v1.Health`` with ``List``: the reference aio servicer answers Check and Watch,
but its List is the generated stub (UNIMPLEMENTED by raising), so every List call would log a
traceback. This one lists the status of every registered service when the installed
grpcio-health-checking has List in its proto; with an older one, List is simply not served
(gRPC answers UNIMPLEMENTED itself)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

from services.common.errors import StatusError

HAS_LIST = "List" in health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name
MAX_LISTED = 100  # the proto: a server with more services answers RESOURCE_EXHAUSTED


class HealthServicer(health.aio.HealthServicer):
    if HAS_LIST:

        async def List(
            self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
        ) -> health_pb2.HealthListResponse:
            statuses = dict(self._server_status)  # the reference servicer's own table
            if len(statuses) > MAX_LISTED:
                raise StatusError(  # the server guard answers it
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {MAX_LISTED} services"
                )
            return health_pb2.HealthListResponse(
                statuses={
                    name: health_pb2.HealthCheckResponse(status=status)
                    for name, status in statuses.items()
                }
            )
