"""The Kafka Connect REST client without a server: a fake `requests` transport adapter answers, so the
requests sent, the retries (connection errors and a worker that cannot answer yet: 409, 503, 500 saying
a rebalance is expected or a timeout; nothing else) and the error messages are checked."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter

from cdc_pipeline.kafka_connect import ATTEMPTS, ConnectClient, ConnectError, redact_url
from cdc_pipeline.resources import KafkaConnectResource
from cdc_pipeline.resources import connect as connect_resource

URL = "http://connect.example:8083"
Answer = Callable[[requests.PreparedRequest], requests.Response]


def answer(status: int, body: Any = None, *, text: str | None = None) -> Answer:
    def make(request: requests.PreparedRequest) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        content = text if text is not None else ("" if body is None else json.dumps(body))
        response._content = content.encode()
        response.url = request.url or ""
        response.request = request
        return response

    return make


def refuse(request: requests.PreparedRequest) -> requests.Response:
    raise requests.ConnectionError(f"connection refused: {request.url}")


class FakeConnect(BaseAdapter):
    """Answers requests in order from `answers` (the last one repeats) and records what was sent."""

    def __init__(self, *answers: Answer) -> None:
        super().__init__()
        self.answers = list(answers)
        self.sent: list[tuple[str, str, Any, Any]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        body = json.loads(request.body) if request.body else None
        self.sent.append((request.method or "", request.url or "", body, kwargs.get("timeout")))
        make = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return make(request)

    def close(self) -> None:
        pass


def client(fake: FakeConnect, url: str = URL, sleeps: list[float] | None = None) -> ConnectClient:
    session = requests.Session()
    session.mount("http://", fake)
    waits = sleeps if sleeps is not None else []
    return ConnectClient(url, session=session, sleep=waits.append)


def test_the_connector_calls_send_the_rest_requests_connect_expects() -> None:
    fake = FakeConnect(answer(201, {"name": "cdc-a b", "config": {"k": "v"}}), answer(204), answer(200, ["x"]))
    connect = client(fake)
    assert connect.put_connector_config("cdc-a b", {"k": "v"}) == {"name": "cdc-a b", "config": {"k": "v"}}
    connect.pause("cdc-a b")  # 204: no body, no answer
    assert connect.connectors() == ["x"]
    connect.resume("c")
    connect.restart("c", only_failed=True)
    connect.delete("c")
    connect.connector_status("c")
    connect.connector_config("c")
    connect.connector_plugins()
    assert [(method, url, body) for method, url, body, _ in fake.sent] == [
        ("PUT", f"{URL}/connectors/cdc-a%20b/config", {"k": "v"}),
        ("PUT", f"{URL}/connectors/cdc-a%20b/pause", None),
        ("GET", f"{URL}/connectors", None),
        ("PUT", f"{URL}/connectors/c/resume", None),
        ("POST", f"{URL}/connectors/c/restart?includeTasks=true&onlyFailed=true", None),
        ("DELETE", f"{URL}/connectors/c", None),
        ("GET", f"{URL}/connectors/c/status", None),
        ("GET", f"{URL}/connectors/c/config", None),
        ("GET", f"{URL}/connector-plugins", None),
    ]
    assert {timeout for *_, timeout in fake.sent} == {30.0}


def test_a_rebalance_and_connection_errors_are_retried() -> None:
    sleeps: list[float] = []
    fake = FakeConnect(answer(409, {"message": "rebalance in progress"}), refuse, answer(200, {"connector": {}}))
    assert client(fake, sleeps=sleeps).connector_status("c") == {"connector": {}}
    assert len(fake.sent) == 3 and len(sleeps) == 2  # waited before each retry


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (409, "Cannot complete request because of a conflicting operation (e.g. worker rebalance)"),
        (500, "Request cannot be completed because a rebalance is expected"),  # seen in CI on a PUT's GET
        (500, "Request timed out"),
        (503, "Service Unavailable"),
    ],
)
def test_a_worker_that_cannot_answer_yet_is_asked_again(status: int, message: str) -> None:
    fake = FakeConnect(answer(status, {"error_code": status, "message": message}), answer(200, {"name": "c"}))
    assert client(fake).connector_config("c") == {"name": "c"}
    assert len(fake.sent) == 2


def test_connection_errors_give_up_after_the_attempts_with_requests_own_error() -> None:
    fake = FakeConnect(refuse)
    with pytest.raises(requests.ConnectionError):
        client(fake).connectors()
    assert len(fake.sent) == ATTEMPTS


@pytest.mark.parametrize("status", [400, 404, 500])
def test_other_refusals_are_final_and_name_the_connector_and_url_without_credentials(status: int) -> None:
    fake = FakeConnect(answer(status, {"error_code": status, "message": "Connector cdc-shop not found"}))
    connect = client(fake, url="http://admin:s3cret@connect.example:8083/")
    with pytest.raises(ConnectError) as raised:
        connect.connector_status("cdc-shop")
    message = str(raised.value)
    assert message.startswith(f"{status} GET /connectors/cdc-shop/status: Connector cdc-shop not found")
    assert "connector cdc-shop" in message and "http://connect.example:8083/" in message
    assert "s3cret" not in message and "admin" not in message
    assert (raised.value.status, raised.value.connector, raised.value.not_found) == (status, "cdc-shop", status == 404)
    assert len(fake.sent) == 1
    assert str(pickle.loads(pickle.dumps(raised.value))) == message


def test_an_error_without_json_carries_connects_text() -> None:
    fake = FakeConnect(answer(500, text="<html>Server Error</html>"))
    with pytest.raises(ConnectError, match=r"^500 GET /connectors: <html>Server Error</html> \(Kafka Connect at "):
        client(fake).connectors()


def test_a_budget_bounds_the_retries_and_each_attempt() -> None:
    # The first wait (0.5 s) would outlast a 0.1 s budget: one attempt, with the shortest timeout.
    fake = FakeConnect(answer(409, {"message": "rebalance in progress"}))
    with pytest.raises(ConnectError, match="^409 "):
        client(fake).connector_status("c", budget_s=0.1)
    assert len(fake.sent) == 1 and fake.sent[0][3] == 0.5


def test_redact_url() -> None:
    assert redact_url("https://user:secret@connect.example:8083/") == "https://connect.example:8083/"
    assert redact_url("http://127.0.0.1:8083") == "http://127.0.0.1:8083"


def test_the_resource_is_the_client_with_its_settings() -> None:
    resource = KafkaConnectResource(url=URL, timeout_s=7.0)
    assert (resource.client().url, resource.client().timeout_s) == (URL, 7.0)
    assert connect_resource.ConnectError is ConnectError  # still importable from the resource's module


def test_the_resources_methods_are_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a session the client sends with `requests.request`, as the resource always did.
    fake = FakeConnect(answer(200, {"connector": {"state": "RUNNING"}}))
    session = requests.Session()
    session.mount("http://", fake)
    monkeypatch.setattr(requests, "request", session.request)
    resource = KafkaConnectResource(url=URL)
    assert resource.connector_status("c", budget_s=10) == {"connector": {"state": "RUNNING"}}
    resource.restart("c", include_tasks=False)
    resource.put_connector_config("c", {"k": "v"})
    resource.request("GET", "/")
    assert [(method, url) for method, url, *_ in fake.sent] == [
        ("GET", f"{URL}/connectors/c/status"),
        ("POST", f"{URL}/connectors/c/restart?includeTasks=false&onlyFailed=false"),
        ("PUT", f"{URL}/connectors/c/config"),
        ("GET", f"{URL}/"),
    ]
