"""Shared fixtures: a trustme CA, TLS fake providers, and the real egress process."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from tests.fake_provider import FakeProvider
from tests.support import EgressProcess, NatsServer


@pytest.fixture(scope="session")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(certificate_authority: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(path))
    return path


def start_fake_provider(certificate_authority: trustme.CA, names: tuple[str, ...] = ("localhost", "127.0.0.1")):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert(*names).configure_cert(context)
    return FakeProvider(context).start()


@pytest.fixture
def fake_provider(certificate_authority: trustme.CA) -> Iterator[FakeProvider]:
    provider = start_fake_provider(certificate_authority)
    yield provider
    provider.stop()


def provider_config(
    fake: FakeProvider,
    ca_file: Path,
    server: str = "",
    upstream: str = "",
    extra: str = "",
    pool_keys: dict[str, Path] | None = None,
) -> str:
    """A config routing the openai and anthropic rows (and the drop-in /v1 route) to the fake.

    `server` and `upstream` are extra lines for those tables; `extra` is appended as is;
    `pool_keys` maps "openai" / "anthropic" to a key file for that row.
    """
    pools = {name: f'pool_keys = ["file:{path}"]' for name, path in (pool_keys or {}).items()}
    return f"""
[server]
{server}

[upstream]
ca_file = "{ca_file}"
{upstream}

[providers.openai]
base_url = "{fake.base_url}"
{pools.get("openai", "")}

[providers.anthropic]
base_url = "{fake.base_url}"
{pools.get("anthropic", "")}

[providers.local-vllm]
base_url = "{fake.base_url}/vllm-prefix"
auth = "bearer"
dialect = "openai"
{extra}
"""


def virtual_key_config(fake: FakeProvider, ca_file: Path, workdir: Path, issuer_public_key: str, extra: str = ""):
    """`provider_config` that trusts one issuer and gives openai and anthropic one pool key each."""
    pool = workdir / "pool.keys"
    pool.write_text("sk-pool-test-0123456789\n")
    keys = f'[keys]\ntrusted_issuers = ["{issuer_public_key}"]\n\n'
    return provider_config(fake, ca_file, pool_keys={"openai": pool, "anthropic": pool}, extra=keys + extra)


@pytest.fixture
def egress_processes(request: pytest.FixtureRequest) -> Iterator[list[EgressProcess]]:
    """The egress processes a test starts: each stopped at its end, whatever the outcome, and their
    logs printed when it failed. Append a process before starting it."""
    started: list[EgressProcess] = []
    yield started
    for process in started:
        process.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for process in started:
            print(process.logs())


@pytest.fixture
def start_egress(tmp_path: Path, egress_processes: list[EgressProcess]) -> Callable[..., EgressProcess]:
    def start(config_text: str, name: str = "egress", workers: int = 1) -> EgressProcess:
        process = EgressProcess(tmp_path, config_text, name=name, workers=workers)
        egress_processes.append(process)
        return process.start()

    return start


@pytest.fixture
def egress(start_egress, fake_provider: FakeProvider, ca_file: Path) -> EgressProcess:
    return start_egress(provider_config(fake_provider, ca_file))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path).start()
    yield server
    server.kill()
