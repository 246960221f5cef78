"""The Codex CLI (`codex exec`, from the npm registry) against egress, a Claude model translated from
the Responses API to the strict fake Anthropic, for one turn that runs a tool.

`.ci/run` installs the pinned CLI (`npm ci --prefix tests/codex`) where the registry has it; the test
is skipped only when it could not be installed. Codex runs with a CODEX_HOME and HOME of its own
under the test's temporary directory, its model provider pointed at egress, and no internet.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.test_responses import gateway  # noqa: F401  (the fixture: claude-* to the fake Anthropic)

CODEX = Path(__file__).parent / "codex" / "node_modules" / ".bin" / "codex"
MARK = "egress-codex-tool-ran"

pytestmark = pytest.mark.timeout(120)


def codex_home(root: Path, base_url: str, scenario: str) -> Path:
    home = root / "codex-home"
    home.mkdir()
    # https://github.com/openai/codex/blob/main/docs/config.md: a model provider of our own.
    (home / "config.toml").write_text(
        f"""
model = "claude-fake"
model_provider = "egress"
# Codex's default web search is its cached one (`external_web_access: false`): egress leaves it out
# for a Claude model, with a Warning, so a Codex config needs nothing more than the provider.

[model_providers.egress]
name = "egress"
base_url = "{base_url}"
env_key = "EGRESS_API_KEY"
wire_api = "responses"
http_headers = {{ "x-fake-scenario" = {orjson.dumps(scenario).decode()} }}
request_max_retries = 0
stream_max_retries = 0
"""
    )
    return home


def test_codex_exec_runs_one_tool_using_turn(gateway, fake_provider, tmp_path):  # noqa: F811
    if not CODEX.exists():
        pytest.skip("the Codex CLI could not be installed here (npm ci --prefix tests/codex)")
    work = tmp_path / "work"
    work.mkdir()
    scenario = "tool-once:exec_command:" + orjson.dumps({"cmd": f"echo {MARK}"}).decode()
    home = codex_home(tmp_path, gateway.url + "/v1", scenario)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("OPENAI_", "CODEX_"))}
    env.update({"CODEX_HOME": str(home), "HOME": str(tmp_path), "EGRESS_API_KEY": "sk-ant-byo-codex"})
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "--sandbox", "read-only", "say hi with the shell"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    shown = f"codex exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    print(shown)
    messages = [request for request in fake_provider.requests if request.target.startswith("/v1/messages")]
    assert done.returncode == 0, shown
    assert len(messages) >= 2, shown
    last = orjson.loads(messages[-1].body)["messages"][-1]["content"]
    assert last[0]["type"] == "tool_result" and MARK in orjson.dumps(last).decode(), shown
    assert "Done: the tool answered." in done.stdout + done.stderr
