"""The transactional outbox: effects that commit with the data and survive crashes and outages.

Needs the ``sqlalchemy`` extra. See the guide page "Effects that survive"::

    from polydatum.outbox import Outbox

    outbox = Outbox(db)          # db: a polydatum Database installed on dm
    outbox.install(dm)

    @outbox.handler("webhook")
    def post_webhook(effect):
        ...

    with dm.context() as ctx:
        ctx.outbox.add("webhook", {"order": 7}, key="order-7")

.. versionadded:: 2.0
"""

from __future__ import annotations

from polydatum.errors import EffectDeferred
from polydatum.outbox._core import (
    AsyncOutboxSender,
    DeadEffect,
    Effect,
    Outbox,
    OutboxSender,
    Status,
)
from polydatum.outbox._inbox import Inbox
from polydatum.outbox._relay import Metrics, Relay

__all__ = [
    "AsyncOutboxSender",
    "DeadEffect",
    "Effect",
    "EffectDeferred",
    "Inbox",
    "Metrics",
    "Outbox",
    "OutboxSender",
    "Relay",
    "Status",
]
