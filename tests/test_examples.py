"""The example configs in deploy/examples load with the daemons' own config classes."""

from pathlib import Path

import pytest

from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig
from ras.client.config import ClientConfig
from ras.config import load
from ras.gateway.config import GatewayConfig
from ras.halb.config import HalbConfig

EXAMPLES = Path(__file__).parent.parent / "deploy" / "examples"


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("broker", BrokerConfig),
        ("gateway", GatewayConfig),
        ("agent", AgentConfig),
        ("client", ClientConfig),
        ("halb", HalbConfig),
    ],
)
def test_example_config_loads(name, cls):
    cfg = load(cls, EXAMPLES / f"{name}.toml")
    assert isinstance(cfg, cls)


def test_example_broker_publishes_two_resources():
    cfg = load(BrokerConfig, EXAMPLES / "broker.toml")
    assert [r.id for r in cfg.resources] == ["desktop", "desktop-admins"]
    assert cfg.resources[1].groups == ("admins",)
