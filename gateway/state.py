"""The objects one running gateway is made of, built once by create_app and passed around."""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backends.supervisor import Supervisor
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.tenancy import Tenancy

if TYPE_CHECKING:
    from gateway.admin import AdminAuth


@dataclass
class Gateway:
    config: Config
    supervisor: Supervisor
    keys: Tenancy
    metrics: Metrics
    proxy: Proxy
    started: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    admin: "AdminAuth | None" = None  # its keys follow a reload (gateway/settings.py)
